"""Starting a run: the root span, PipelineStarted on the runs topic and the first ModelReady.

From there the run is choreographed: every phase service publishes the next step's ModelReady itself.
"""
from __future__ import annotations

import uuid

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, TracerProvider

from shared.contracts.agentforge.v1 import events_pb2, pipeline_pb2
from shared.fabric.bus import Bus, Headers
from shared.fabric.events import Envelope, cloudevent_headers, new_envelope, step_config, step_gate
from shared.fabric.phases import phase_name
from shared.fabric.topics import Topics, check_phase_name
from shared.fabric.tracing import TRACER_NAME, header_values, inject_context, set_attributes


async def publish_envelope(bus: Bus, topic: str, envelope: Envelope, trace_headers: Headers) -> None:
    """Publish keyed by run id, with CloudEvents headers and the trace context."""
    headers = cloudevent_headers(envelope) + list(trace_headers)
    await bus.publish(topic, envelope.SerializeToString(), key=envelope.run_id, headers=headers)


def check_spec(spec: pipeline_pb2.PipelineSpec) -> list[str]:
    """The phase names of the steps; raises ValueError/LookupError on an empty spec, a phase that is not
    registered (or a module phase where those are off), a config that is not JSON, or a gate that does not parse."""
    if not spec.steps:
        raise ValueError("a pipeline needs at least one step")
    names = []
    for step in spec.steps:
        names.append(check_phase_name(phase_name(step.phase)))
        step_config(step)
        step_gate(step)
    return names


async def start_pipeline(
    bus: Bus,
    spec: pipeline_pb2.PipelineSpec,
    *,
    topics: Topics = Topics(),
    run_id: str | None = None,
    source: str = "agentforge-control",
    tracer_provider: TracerProvider | None = None,
) -> str:
    """Emit the start of a run and return its run id (minted here when not given)."""
    names = check_spec(spec)
    run_id = run_id or uuid.uuid4().hex
    await bus.ensure_topics([topics.runs, topics.phase_input(names[0])])  # the broker auto-creates none
    tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer(TRACER_NAME)
    # An empty parent context: every run is its own trace, whatever span the caller is in.
    with tracer.start_as_current_span(
        f"pipeline {spec.name or 'run'}", context=otel_context.Context(), kind=SpanKind.PRODUCER
    ) as span:
        set_attributes(span, {"agentforge.run_id": run_id, "agentforge.phases": names})
        trace_headers: Headers = []
        inject_context(trace_headers)
        trace_fields = header_values(trace_headers)
        started = new_envelope(run_id, source, **trace_fields, pipeline_started=events_pb2.PipelineStarted(spec=spec))
        await publish_envelope(bus, topics.runs, started, trace_headers)
        first = events_pb2.ModelReady(spec=spec, step=0, inputs=spec.inputs)
        ready = new_envelope(run_id, source, **trace_fields, model_ready=first)
        await publish_envelope(bus, topics.phase_input(names[0]), ready, trace_headers)
    return run_id
