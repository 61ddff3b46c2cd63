"""The eight-phase `smoke` pipeline as eight phase services on Kafka, the S3 server and Jaeger: it completes,
each phase stores exactly one output, and Jaeger holds one trace with a span from every service under one
root. And a quality gate distributed: a gated-out step fails the run with the reason in the events, the
dead-letter topic and the trace, and nothing downstream runs."""
from __future__ import annotations

import asyncio

import pytest

from shared.fabric.cli import PIPELINE_ORDER, load_spec
from shared.fabric.dlq import list_dead_letters
from shared.fabric.events import FailureReason, pipeline_spec
from shared.fabric.kafka_bus import KafkaBus
from shared.fabric.topics import Topics
from shared.scorecard import MEAN_METRIC
from tests.fabric_cluster import (
    FINETUNE, SCALE, SEED, chains_to_one_root, jaeger_trace, kind, output_objects, run_events, start_run,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CONTROL = "agentforge-test-control"


def test_smoke_pipeline_runs_across_the_eight_services_as_one_trace(fabric):
    settings, start_services, _ = fabric
    start_services(*PIPELINE_ORDER)
    run_id = asyncio.run(start_run(settings, load_spec(None, "smoke")))
    events = asyncio.run(run_events(settings, {run_id}, {"pipeline_completed", "phase_failed"}, timeout_s=900))
    assert kind(events[-1]) == "pipeline_completed", events[-1]
    completed = [e.phase_completed for e in events if kind(e) == "phase_completed"]
    assert [c.phase for c in completed] == list(PIPELINE_ORDER)

    objects = output_objects(settings)
    for done in completed:
        mine = [name for name in objects if name.startswith(f"outputs/{done.phase}/")]
        markers = [name for name in mine if name.endswith("/completed.pb")]
        assert len(markers) == 1 and len(mine) == 1 + len(done.outputs), mine  # one output: its archives, one marker

    services = {f"agentforge-{phase}" for phase in PIPELINE_ORDER}
    spans = jaeger_trace(settings, events[-1].trace.traceparent.split("-")[1], services | {CONTROL})
    chains_to_one_root(spans, services, CONTROL)


def test_a_gated_out_step_fails_the_distributed_run_and_nothing_downstream_runs(fabric):
    settings, start_services, tmp = fabric
    start_services(SEED, SCALE, FINETUNE)
    log = tmp / "invocations.log"
    card = {"split": "validation", "tasks": [["arithmetic", 1, 4]], "max_new_tokens": 3, "max_length": 32}
    spec = pipeline_spec([(SEED, {"seed": 5}), (SCALE, {"factor": 0.8}), (FINETUNE, {"steps": 2, "invocation_log": str(log)})],
                         name="gated", gates={1: {"metric": MEAN_METRIC, "floor": 1.01, "scorecard": card}})
    run_id = asyncio.run(start_run(settings, spec))
    events = asyncio.run(run_events(settings, {run_id}, {"pipeline_completed", "phase_failed"}, timeout_s=300, linger_s=5))
    failed = events[-1]
    assert kind(failed) == "phase_failed" and "pipeline_completed" not in [kind(e) for e in events]
    assert (failed.phase_failed.step, failed.phase_failed.reason) == (1, FailureReason.GATE_FAILED)
    assert "floor 1.01" in failed.phase_failed.error
    assert not log.exists()
    assert not [name for name in output_objects(settings) if name.startswith("outputs/fabric_scale/")]

    (letter,) = asyncio.run(list_dead_letters(KafkaBus(settings.kafka_bootstrap), Topics.from_settings(settings), idle_s=8))
    assert (letter.run_id, letter.reason) == (run_id, FailureReason.GATE_FAILED)
    spans = jaeger_trace(settings, failed.trace.traceparent.split("-")[1], {"agentforge-fabric_scale", CONTROL})
    (scale,) = [span for span in spans if span["service"] == "agentforge-fabric_scale"]
    assert "floor" in scale.get("status", {}).get("message", "")
