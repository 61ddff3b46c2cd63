"""The fabric for real: phase services as separate processes on Kafka, the S3 server and Jaeger.

Every test gets its own topic prefix and bucket, so runs never see each other's events or outputs.
The services run the test phases of tests/fabric_phases.py, loaded as "module:Class"; the `fabric`
fixture and the helpers are in tests/fabric_cluster.py.
"""
from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import pytest

from shared.fabric.dlq import LetterFilter, list_dead_letters, purge_dead_letters, redrive_dead_letters
from shared.fabric.embedded import run_embedded_async
from shared.fabric.events import FailureReason
from shared.fabric.kafka_bus import KafkaBus
from shared.fabric.local_store import LocalStore
from shared.fabric.pipeline import publish_envelope
from shared.fabric.s3_store import S3Store
from shared.fabric.topics import Topics
from shared.fabric.transport import download_checkpoint, pack_checkpoint, upload_checkpoint
from tests.fabric_cluster import (
    FINETUNE, SCALE, SEED, chains_to_one_root, jaeger_trace, kind, output_objects, run_events, start_run, three_step_spec,
)
from tests.fabric_phases import altered, scale_event, seed_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.slow]

def test_pipeline_runs_across_services_with_one_trace_and_matches_embedded(fabric):
    settings, start_services, tmp = fabric
    start_services(SEED, SCALE, FINETUNE)
    spec = three_step_spec(tmp / "invocations.log")
    run_id = asyncio.run(start_run(settings, spec))
    events = asyncio.run(run_events(settings, {run_id}, {"pipeline_completed", "phase_failed"}, timeout_s=300))
    assert kind(events[-1]) == "pipeline_completed", events[-1]
    completed = [e.phase_completed for e in events if kind(e) == "phase_completed"]
    assert [c.phase for c in completed] == ["fabric_seed", "fabric_scale", "fabric_finetune"]

    final = events[-1].pipeline_completed.outputs[0]
    assert final.uri.startswith(f"s3://{settings.s3_bucket}/")
    manifest = download_checkpoint(S3Store.from_settings(settings), final, tmp / "final")  # SHA-256 + manifest
    assert manifest.digest == final.digest

    # One trace: the root span of the start, and a span of every phase service chained to it.
    trace_id = events[-1].trace.traceparent.split("-")[1]
    phase_services = {"agentforge-fabric_seed", "agentforge-fabric_scale", "agentforge-fabric_finetune"}
    spans = jaeger_trace(settings, trace_id, phase_services | {"agentforge-test-control"})
    chains_to_one_root(spans, phase_services, "agentforge-test-control")

    # Parity: the same spec embedded (local store, in-process bus) gives the same digests at every step.
    with tempfile.TemporaryDirectory() as store_dir:
        embedded = asyncio.run(run_embedded_async(three_step_spec(tmp / "invocations.log"), store=LocalStore(Path(store_dir))))
    assert [s.outputs[0].digest for s in embedded.steps] == [c.outputs[0].digest for c in completed]


def test_killed_service_is_restarted_without_losing_or_duplicating_outputs(fabric):
    settings, start_services, tmp = fabric
    _, _, finetune = start_services(SEED, SCALE, FINETUNE)
    log = tmp / "invocations.log"
    run_id = asyncio.run(start_run(settings, three_step_spec(log, hold_s=6.0)))
    deadline = time.monotonic() + 300
    while not (log.exists() and log.read_text()):  # the fine-tune transform has started
        assert time.monotonic() < deadline, "fine-tune never started"
        time.sleep(0.2)
    finetune.kill()
    start_services(FINETUNE)
    events = asyncio.run(run_events(settings, {run_id}, {"pipeline_completed", "phase_failed"}, timeout_s=300))
    assert kind(events[-1]) == "pipeline_completed"
    assert log.read_text().count("\n") == 2  # killed mid-work, then redone from the uncommitted event
    objects = output_objects(settings)
    for phase in ("fabric_seed", "fabric_scale", "fabric_finetune"):
        mine = [name for name in objects if name.startswith(f"outputs/{phase}/")]
        assert len(mine) == 2, mine  # one model archive and one completion marker: exactly one output


def test_handler_longer_than_max_poll_interval_runs_exactly_once(fabric):
    settings, start_services, tmp = fabric
    start_services(SEED, SCALE)
    # A second replica would take the event over if the first were evicted.
    start_services(FINETUNE, FINETUNE, max_poll_interval_ms=3000)
    log = tmp / "invocations.log"
    run_id = asyncio.run(start_run(settings, three_step_spec(log, hold_s=12.0)))
    # Linger: a duplicate, if any, would come after an eviction and a rebalance.
    events = asyncio.run(run_events(settings, {run_id}, {"pipeline_completed", "phase_failed"}, timeout_s=300,
                                    linger_s=15))
    assert [kind(e) for e in events].count("pipeline_completed") == 1
    assert "phase_failed" not in [kind(e) for e in events]
    assert log.read_text().count("\n") == 1
    finetune_done = [e for e in events if kind(e) == "phase_completed" and e.phase_completed.phase == "fabric_finetune"]
    assert len(finetune_done) == 1 and not finetune_done[0].phase_completed.reused


def test_bad_inputs_are_dead_lettered_with_reasons_and_redrive_succeeds(fabric):
    settings, start_services, tmp = fabric
    topics = Topics.from_settings(settings)
    store = S3Store.from_settings(settings)
    checkpoint = seed_checkpoint(tmp / "ckpt", seed=4)
    good = upload_checkpoint(store, checkpoint, "inputs/seed.tar")
    missing = altered(good, uri=good.uri.replace("inputs/seed.tar", "inputs/later.tar"))
    wrong_sha = altered(good, sha256="e" * 64)

    future = scale_event("run-future", good, 0.5)
    future.schema_version = 99
    unknown_next = scale_event("run-unknown", good, 0.5)  # its next step names a phase nobody registered
    unknown_next.model_ready.spec.steps.add(phase="nosuchphase")
    start_services(SCALE)
    topic = topics.phase_input("fabric_scale")

    async def publish_all():
        bus = KafkaBus(settings.kafka_bootstrap)
        await bus.start()
        try:
            await bus.publish(topic, b"\x00\xffgarbage", key="run-garbage")
            await bus.publish(topic, future.SerializeToString(), key="run-future")
            await publish_envelope(bus, topic, unknown_next, [])
            for run_id, ref, factor in [("run-missing", missing, 0.25), ("run-sha", wrong_sha, 0.5), ("run-good", good, 0.5)]:
                await publish_envelope(bus, topic, scale_event(run_id, ref, factor), [])
        finally:
            await bus.stop()

    asyncio.run(publish_all())
    events = asyncio.run(run_events(settings, {"run-unknown", "run-missing", "run-sha", "run-good"},
                                    {"pipeline_completed", "phase_failed"}, timeout_s=300))
    outcome = {e.run_id: kind(e) for e in events if kind(e) in ("pipeline_completed", "phase_failed")}
    assert outcome == {"run-unknown": "phase_failed", "run-missing": "phase_failed", "run-sha": "phase_failed",
                       "run-good": "pipeline_completed"}

    letters = asyncio.run(list_dead_letters(KafkaBus(settings.kafka_bootstrap), topics, idle_s=8))
    assert sorted(letter.reason for letter in letters) == sorted([
        FailureReason.UNDECODABLE, FailureReason.UNKNOWN_SCHEMA_VERSION, FailureReason.INVALID_SPEC,
        FailureReason.MISSING_CHECKPOINT, FailureReason.SHA256_MISMATCH,
    ])
    assert all(letter.original_topic == topic and letter.original_offset >= 0 for letter in letters)

    with tempfile.TemporaryDirectory() as scratch:  # fix the cause: the missing checkpoint arrives
        tar_path = Path(scratch) / "c.tar"
        store.put_file("inputs/later.tar", tar_path, pack_checkpoint(checkpoint, tar_path))

    async def redrive():
        bus = KafkaBus(settings.kafka_bootstrap)
        await bus.start()
        try:
            return await redrive_dead_letters(bus, topics, idle_s=8)
        finally:
            await bus.stop()

    assert len(asyncio.run(redrive())) == 5
    events = asyncio.run(run_events(settings, {"run-missing"}, {"pipeline_completed"}, timeout_s=120))
    assert kind(events[-1]) == "pipeline_completed"

    # The unregistered phase cannot be fixed by a redrive: its letter is back, and a purge settles it.
    deadline = time.monotonic() + 120
    while not [letter for letter in asyncio.run(list_dead_letters(KafkaBus(settings.kafka_bootstrap), topics, idle_s=5))
               if letter.run_id == "run-unknown"]:
        assert time.monotonic() < deadline, "the redriven run-unknown did not fail again"

    async def purge():
        bus = KafkaBus(settings.kafka_bootstrap)
        await bus.start()
        try:
            return await purge_dead_letters(bus, topics, idle_s=5, select=LetterFilter(run_id="run-unknown"))
        finally:
            await bus.stop()

    assert [letter.reason for letter in asyncio.run(purge())] == [FailureReason.INVALID_SPEC]
    left = asyncio.run(list_dead_letters(KafkaBus(settings.kafka_bootstrap), topics, idle_s=5))
    assert "run-unknown" not in {letter.run_id for letter in left}
