"""OpenTelemetry for the fabric: one trace per run, a span per phase, context carried in Kafka headers.

The pipeline start opens the root span; each phase service continues the trace from the `traceparent`
header of the event it consumes and publishes its own event inside its span, so the run is one chain.
Spans go over OTLP/HTTP to Settings.otlp_endpoint (Jaeger v2 takes OTLP on 4318). Telemetry never breaks
the message path: failures here are logged and swallowed.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import Span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from shared.settings import Settings

log = logging.getLogger(__name__)

TRACER_NAME = "agentforge.fabric"
_propagator = TraceContextTextMapPropagator()
Headers = list[tuple[str, bytes]]


class _HeaderGetter(Getter[Headers]):
    def get(self, carrier: Headers, key: str) -> list[str] | None:
        found = [value.decode("latin-1") for name, value in carrier if name == key]
        return found or None

    def keys(self, carrier: Headers) -> list[str]:
        return [name for name, _ in carrier]


class _HeaderSetter(Setter[Headers]):
    def set(self, carrier: Headers, key: str, value: str) -> None:
        carrier[:] = [(name, v) for name, v in carrier if name != key]
        carrier.append((key, value.encode("latin-1")))


def tracer_provider(service_name: str, settings: Settings, exporter: SpanExporter | None = None) -> TracerProvider:
    """A provider for one service: OTLP/HTTP when an endpoint is set, `exporter` for tests, else none."""
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif settings.otlp_endpoint:
        endpoint = settings.otlp_endpoint.rstrip("/") + "/v1/traces"
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, timeout=5)))
    return provider


def inject_context(headers: Headers, context: Context | None = None) -> None:
    """Add `traceparent` (and `tracestate`) for the current span to `headers`, a mutable list."""
    try:
        _propagator.inject(headers, context=context, setter=_HeaderSetter())
    except Exception:
        log.exception("could not inject trace context; the event goes without it")


def extract_context(headers: Iterable[tuple[str, bytes]], fallback: Mapping[str, str] | None = None) -> Context:
    """The context carried by the headers, else by `fallback` (the Envelope's copy), else an empty one."""
    try:
        headers = list(headers)
        if any(name == "traceparent" for name, _ in headers):
            return _propagator.extract(headers, getter=_HeaderGetter())
        if fallback and fallback.get("traceparent"):
            return _propagator.extract(dict(fallback))
    except Exception:
        log.exception("could not extract trace context; starting a new trace")
    return otel_context.Context()


def header_values(headers: Headers) -> dict[str, str]:
    return {name: value.decode("latin-1") for name, value in headers if name in ("traceparent", "tracestate")}


def set_attributes(span: Span, attributes: Mapping[str, Any]) -> None:
    """Set what OpenTelemetry can hold (str, bool, int, float and lists of them); skip the rest."""
    for name, value in attributes.items():
        try:
            if isinstance(value, (str, bool, int, float)) or (
                isinstance(value, (list, tuple)) and all(isinstance(v, (str, bool, int, float)) for v in value)
            ):
                span.set_attribute(name, value)
        except Exception:
            log.exception("could not set span attribute %s", name)
