"""Building, encoding and checking the Envelope every agentforge topic carries.

Kafka headers follow the CloudEvents Kafka binding (ce_id, ce_type, ce_source, ce_specversion) so tools
can route on them without parsing the body; the body is the protobuf Envelope.
"""
from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from google.protobuf.message import DecodeError

from shared.contracts.agentforge.v1 import events_pb2, pipeline_pb2

SCHEMA_VERSION = 1
CONTENT_TYPE = "application/x-protobuf; messageType=agentforge.v1.Envelope"

Envelope = events_pb2.Envelope
Headers = list[tuple[str, bytes]]


class FailureReason(StrEnum):
    """Why an event was given up on; written to PhaseFailed.reason and the dead letter's headers."""

    UNDECODABLE = "undecodable"
    UNKNOWN_SCHEMA_VERSION = "unknown_schema_version"
    WRONG_EVENT = "wrong_event"  # decodes, but is not a ModelReady for this phase
    MISSING_CHECKPOINT = "missing_checkpoint"
    SHA256_MISMATCH = "sha256_mismatch"
    INVALID_CHECKPOINT = "invalid_checkpoint"  # manifest or file listing does not verify
    INVALID_CONFIG = "invalid_config"
    INVALID_SPEC = "invalid_spec"  # a later step names a phase that is not registered
    PHASE_ERROR = "phase_error"
    INFRASTRUCTURE = "infrastructure_unavailable"  # S3 or Kafka stayed down for the whole retry window
    GATE_FAILED = "gate_failed"  # the output missed the step's quality gate (shared.gate); nothing was handed on


class BadEvent(Exception):
    """An event that no retry can fix: it goes to the dead-letter topic at once."""

    def __init__(self, reason: FailureReason, message: str):
        super().__init__(message)
        self.reason = reason


def new_event_id() -> str:
    return uuid.uuid4().hex


def new_envelope(run_id: str, source: str, traceparent: str = "", tracestate: str = "", **payload: Any) -> Envelope:
    """An Envelope with a fresh event id and one payload, e.g. new_envelope(run, src, model_ready=...)."""
    (field, message), = payload.items()
    envelope = Envelope(
        event_id=new_event_id(),
        schema_version=SCHEMA_VERSION,
        run_id=run_id,
        source=source,
        trace=events_pb2.TraceContext(traceparent=traceparent, tracestate=tracestate),
    )
    envelope.created_at.GetCurrentTime()
    getattr(envelope, field).CopyFrom(message)
    return envelope


def event_type(envelope: Envelope) -> str:
    return f"agentforge.v1.{envelope.WhichOneof('payload')}"


def cloudevent_headers(envelope: Envelope) -> Headers:
    return [
        ("ce_specversion", b"1.0"),
        ("ce_id", envelope.event_id.encode()),
        ("ce_type", event_type(envelope).encode()),
        ("ce_source", envelope.source.encode()),
        ("content-type", CONTENT_TYPE.encode()),
    ]


def decode_envelope(data: bytes | None) -> Envelope:
    """Parse and check an Envelope; anything that is not a current-version event raises BadEvent."""
    if not data:
        raise BadEvent(FailureReason.UNDECODABLE, "empty message body")
    envelope = Envelope()
    try:
        envelope.ParseFromString(data)
    except DecodeError as error:
        raise BadEvent(FailureReason.UNDECODABLE, f"not a protobuf Envelope: {error}") from error
    # Protobuf parses many byte strings without complaint; an Envelope must at least name itself.
    if not envelope.event_id or not envelope.run_id or envelope.schema_version == 0:
        raise BadEvent(FailureReason.UNDECODABLE, "not an agentforge Envelope (no event id, run id or schema version)")
    if envelope.schema_version != SCHEMA_VERSION:
        raise BadEvent(
            FailureReason.UNKNOWN_SCHEMA_VERSION,
            f"schema version {envelope.schema_version}; this service reads version {SCHEMA_VERSION}",
        )
    if envelope.WhichOneof("payload") is None:
        raise BadEvent(FailureReason.UNDECODABLE, "envelope carries no payload (written by a newer schema?)")
    return envelope


def pipeline_spec(steps: list[tuple[str, dict[str, Any]]], name: str = "", inputs=(),
                  gates: Mapping[int, dict[str, Any]] | None = None) -> pipeline_pb2.PipelineSpec:
    """PipelineSpec from (phase, config) pairs: pipeline_spec([("cognate", {"seed": 1}), ("bitnet", {})]);
    `gates` maps a step's index to its quality gate (shared.gate.Gate as a dict)."""
    gates = gates or {}
    return pipeline_pb2.PipelineSpec(
        name=name,
        steps=[pipeline_pb2.PhaseStep(phase=phase, config_json=json.dumps(config, sort_keys=True),
                                      gate_json=json.dumps(gates[index], sort_keys=True) if index in gates else "")
               for index, (phase, config) in enumerate(steps)],
        inputs=list(inputs),
    )


def step_config(step: pipeline_pb2.PhaseStep) -> dict[str, Any]:
    if not step.config_json:
        return {}
    try:
        config = json.loads(step.config_json)
    except json.JSONDecodeError as error:
        raise BadEvent(FailureReason.INVALID_CONFIG, f"step {step.phase!r}: config is not JSON: {error}") from error
    if not isinstance(config, dict):
        raise BadEvent(FailureReason.INVALID_CONFIG, f"step {step.phase!r}: config must be a JSON object")
    return config


def step_gate(step: pipeline_pb2.PhaseStep):
    """The step's quality gate (shared.gate.Gate), or None; BadEvent INVALID_SPEC for one that does not parse."""
    if not step.gate_json:
        return None
    from pydantic import ValidationError

    from shared.gate import Gate  # the scorecard behind it imports torch: only where a gate is used

    try:
        return Gate.model_validate_json(step.gate_json)
    except ValidationError as error:
        raise BadEvent(FailureReason.INVALID_SPEC, f"step {step.phase!r}: invalid gate: {error}") from error
