"""Trace context travels in Kafka headers; telemetry failures never reach the message path."""
from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from shared.fabric.tracing import extract_context, header_values, inject_context, tracer_provider
from shared.settings import Settings

pytestmark = pytest.mark.unit


def test_context_crosses_headers_from_producer_to_consumer():
    exporter = InMemorySpanExporter()
    tracer = tracer_provider("test", Settings(), exporter=exporter).get_tracer("test")
    headers = [("ce_id", b"1")]
    with tracer.start_as_current_span("produce", kind=SpanKind.PRODUCER) as producer:
        inject_context(headers)
    assert dict(headers)["traceparent"].startswith(b"00-")
    with tracer.start_as_current_span("consume", context=extract_context(headers), kind=SpanKind.CONSUMER):
        pass
    consume = next(s for s in exporter.get_finished_spans() if s.name == "consume")
    assert consume.context.trace_id == producer.get_span_context().trace_id
    assert consume.parent.span_id == producer.get_span_context().span_id


def test_envelope_copy_is_the_fallback_when_headers_are_gone():
    exporter = InMemorySpanExporter()
    tracer = tracer_provider("test", Settings(), exporter=exporter).get_tracer("test")
    headers = []
    with tracer.start_as_current_span("produce") as producer:
        inject_context(headers)
    context = extract_context([], fallback=header_values(headers))
    with tracer.start_as_current_span("consume", context=context):
        pass
    consume = next(s for s in exporter.get_finished_spans() if s.name == "consume")
    assert consume.parent.span_id == producer.get_span_context().span_id


def test_broken_carriers_do_not_raise(caplog):
    tracer = tracer_provider("test", Settings(), exporter=InMemorySpanExporter()).get_tracer("test")
    with tracer.start_as_current_span("produce"):
        inject_context(("immutable",))  # a tuple cannot take the header: logged, not raised
    assert "could not inject trace context" in caplog.text
    assert extract_context([("traceparent", b"\xff\xfe garbage")]) is not None
    assert extract_context(None) is not None
