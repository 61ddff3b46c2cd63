"""The generated code matches the schemas, and events round-trip through their wire format."""
from __future__ import annotations

import pytest

from shared.contracts import generate
from shared.contracts.agentforge.v1 import events_pb2
from shared.fabric.events import (
    SCHEMA_VERSION,
    BadEvent,
    FailureReason,
    cloudevent_headers,
    decode_envelope,
    new_envelope,
    pipeline_spec,
    step_config,
)

pytestmark = pytest.mark.unit


def test_generated_code_is_in_sync_with_the_protos(tmp_path):
    generate.generate(tmp_path)
    fresh = {p.name: p.read_bytes() for p in (tmp_path / generate.PACKAGE_DIR).iterdir()}
    committed_dir = generate.GENERATED_ROOT / generate.PACKAGE_DIR
    committed = {p.name: p.read_bytes() for p in committed_dir.iterdir() if p.is_file()}
    assert sorted(fresh) == sorted(committed), "run `python -m shared.contracts.generate`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"generated code is stale ({stale}): run `python -m shared.contracts.generate`"


def test_envelope_round_trips_and_names_itself():
    spec = pipeline_spec([("cognate", {"seed": 7}), ("bitnet", {})], name="demo")
    envelope = new_envelope("run-1", "test", model_ready=events_pb2.ModelReady(spec=spec, step=1))
    decoded = decode_envelope(envelope.SerializeToString())
    assert decoded == envelope
    assert decoded.schema_version == SCHEMA_VERSION
    assert step_config(decoded.model_ready.spec.steps[0]) == {"seed": 7}  # an exact int, not 7.0
    headers = dict(cloudevent_headers(decoded))
    assert headers["ce_type"] == b"agentforge.v1.model_ready"
    assert headers["ce_id"] == envelope.event_id.encode()


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"", FailureReason.UNDECODABLE),
        (b"\x00\x01garbage", FailureReason.UNDECODABLE),
        (b"hello, this is not protobuf at all", FailureReason.UNDECODABLE),
        (events_pb2.Envelope(event_id="e", run_id="r", schema_version=2).SerializeToString(),
         FailureReason.UNKNOWN_SCHEMA_VERSION),
        (events_pb2.Envelope(event_id="e", run_id="r", schema_version=SCHEMA_VERSION).SerializeToString(),
         FailureReason.UNDECODABLE),  # no payload
    ],
)
def test_bad_bytes_are_refused_with_a_reason(payload, reason):
    with pytest.raises(BadEvent) as caught:
        decode_envelope(payload)
    assert caught.value.reason == reason


def test_step_config_must_be_a_json_object():
    spec = pipeline_spec([("cognate", {})])
    spec.steps[0].config_json = "[1, 2]"
    with pytest.raises(BadEvent) as caught:
        step_config(spec.steps[0])
    assert caught.value.reason == FailureReason.INVALID_CONFIG
