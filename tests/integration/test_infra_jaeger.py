"""A span exported over OTLP/HTTP to the local Jaeger can be read back from its /api/v3."""
import uuid

import httpx
import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from tenacity import retry, retry_if_result, stop_after_delay, wait_fixed

pytestmark = pytest.mark.integration


def test_span_sent_over_otlp_is_read_back_from_api_v3(infra):
    infra.require("jaeger")
    service = f"infra-test-{uuid.uuid4().hex[:8]}"
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{infra.settings.otlp_endpoint}/v1/traces")))
    with provider.get_tracer("infra-test").start_as_current_span("infra-check") as span:
        span.set_attribute("agentforge.check", "round-trip")
    trace_id = format(span.get_span_context().trace_id, "032x")
    provider.shutdown()

    # Jaeger's collector batches spans before storing them, so the trace appears a moment later.
    @retry(retry=retry_if_result(lambda response: response.status_code == 404), stop=stop_after_delay(10),
           wait=wait_fixed(0.2))
    def fetch() -> httpx.Response:
        return httpx.get(f"{infra.settings.jaeger_query_url}/api/v3/traces/{trace_id}", timeout=5)

    response = fetch()
    assert response.status_code == 200, response.text
    resource_spans = response.json()["result"]["resourceSpans"]
    spans = [span for resource in resource_spans for scope in resource["scopeSpans"] for span in scope["spans"]]
    assert [span["name"] for span in spans] == ["infra-check"]
    services = {attribute["value"]["stringValue"] for resource in resource_spans
                for attribute in resource["resource"]["attributes"] if attribute["key"] == "service.name"}
    assert services == {service}
    assert {attribute["key"]: attribute["value"]["stringValue"] for attribute in spans[0]["attributes"]} == {
        "agentforge.check": "round-trip"}
