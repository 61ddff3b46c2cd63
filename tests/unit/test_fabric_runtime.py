"""The phase runtime on the embedded backends: a run end to end, redelivery, dead letters, redrive, traces."""
from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.contracts.agentforge.v1 import events_pb2
from shared.fabric.dlq import DeadLetter, redrive_dead_letters
from shared.fabric.embedded import run_embedded, run_embedded_async
from shared.fabric.events import FailureReason, decode_envelope, new_envelope, pipeline_spec
from shared.fabric.local_store import LocalStore
from shared.fabric.phases import load_phase
from shared.fabric.memory_bus import InMemoryBus
from shared.fabric.pipeline import publish_envelope
from shared.fabric.topics import Topics
from shared.fabric.tracing import tracer_provider
from shared.fabric.transport import download_checkpoint, pack_checkpoint, upload_checkpoint
from shared.fabric.worker import PhaseWorker, RetryPolicy
from shared.settings import Settings
from tests.fabric_phases import (
    Endless, FineTune, ScaleWeights, SeedModel, altered, scale_event, seed_checkpoint, spec_for,
)

pytestmark = pytest.mark.unit

SEED, SCALE, FINETUNE = spec_for(SeedModel, ScaleWeights, FineTune)
TOPICS = Topics()
FAST_RETRY = RetryPolicy(attempts=2, initial_s=0.01, max_s=0.02)


def three_step_spec(invocation_log: Path):
    return pipeline_spec(
        [(SEED, {"seed": 5}), (SCALE, {"factor": 0.8}), (FINETUNE, {"steps": 2, "invocation_log": str(invocation_log)})],
        name="unit",
    )


def events_of(bus: InMemoryBus, topic: str) -> list[events_pb2.Envelope]:
    return [decode_envelope(r.value) for r in bus.records[topic]]


async def serve_until_idle(worker: PhaseWorker, bus: InMemoryBus) -> None:
    """Run the worker until it has committed every record on its topic."""
    stop = asyncio.Event()
    task = asyncio.create_task(worker.serve(stop, poll_s=0.02))
    topic, group = TOPICS.phase_input(worker.name), TOPICS.consumer_group(worker.name)
    while bus.committed[(group, topic)] < len(bus.records[topic]):
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    stop.set()
    await task


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    exporter = InMemorySpanExporter()
    store = LocalStore(root / "store")
    result = run_embedded(
        three_step_spec(root / "invocations.log"),
        store=store,
        settings=Settings(),
        tracer_provider=tracer_provider("unit", Settings(), exporter=exporter),
    )
    return result, store, root, exporter


def test_run_completes_with_verified_lineage_and_measured_reports(finished_run):
    result, store, root, _ = finished_run
    assert [step.phase for step in result.steps] == ["fabric_seed", "fabric_scale", "fabric_finetune"]
    assert not any(step.reused for step in result.steps)
    manifest = download_checkpoint(store, result.outputs[0], root / "final")
    assert manifest.phase == "fabric_finetune" and manifest.digest == result.outputs[0].digest
    for before, after in zip(result.steps, result.steps[1:], strict=False):
        assert list(after.outputs[0].lineage.parent_digests) == [before.outputs[0].digest]
    scale = decode_report(result.steps[1])
    assert scale["norm_after"] == pytest.approx(0.8 * scale["norm_before"], rel=1e-4)
    finetune = decode_report(result.steps[2])
    assert finetune["loss_final"] < finetune["loss_first"]
    kinds = [event.WhichOneof("payload") for event in result.events]
    assert kinds[0] == "pipeline_started" and kinds[-1] == "pipeline_completed"
    assert "phase_progress" in kinds


def decode_report(step):
    return json.loads(step.report_json)


def test_one_trace_per_run_with_every_phase_chained_to_the_root(finished_run):
    result, _, _, exporter = finished_run
    spans = exporter.get_finished_spans()
    by_id = {span.context.span_id: span for span in spans}
    assert len({span.context.trace_id for span in spans}) == 1
    root = next(span for span in spans if span.parent is None)
    assert root.name == "pipeline unit"
    phases = [span for span in spans if span.attributes.get("agentforge.phase")]
    assert sorted(span.name for span in phases) == ["fabric_finetune", "fabric_scale", "fabric_seed"]
    for span in phases:
        assert span.attributes["agentforge.run_id"] == result.run_id
        ancestor = span
        while ancestor.parent is not None:
            ancestor = by_id[ancestor.parent.span_id]
        assert ancestor is root
    finetune = next(span for span in phases if span.name == "fabric_finetune")
    assert finetune.attributes["agentforge.output_digests"] == (result.outputs[0].digest,)
    assert "agentforge.metric.loss_final" in finetune.attributes


def test_redelivered_event_skips_the_work_and_republishes(finished_run):
    result, store, root, _ = finished_run
    spec = three_step_spec(root / "invocations.log")
    ready = events_pb2.ModelReady(spec=spec, step=2, inputs=result.steps[1].outputs)
    envelope = new_envelope(result.run_id, "test", model_ready=ready)
    bus = InMemoryBus()

    async def redeliver_twice():
        worker = PhaseWorker(FINETUNE, bus, store)
        for _ in range(2):  # the same event twice, as after a rebalance
            await publish_envelope(bus, TOPICS.phase_input("fabric_finetune"), envelope, [])
        await serve_until_idle(worker, bus)

    asyncio.run(redeliver_twice())
    assert (root / "invocations.log").read_text().count("\n") == 1  # the transform ran once, in the first run
    completed = [e.phase_completed for e in events_of(bus, TOPICS.runs) if e.WhichOneof("payload") == "phase_completed"]
    assert len(completed) == 2 and all(c.reused for c in completed)
    assert [c.outputs[0].digest for c in completed] == [result.outputs[0].digest] * 2
    finished = [e for e in events_of(bus, TOPICS.runs) if e.WhichOneof("payload") == "pipeline_completed"]
    assert len(finished) == 2
    assert len(list((store.root / "outputs" / "fabric_finetune").iterdir())) == 1


@pytest.fixture(scope="module")
def stored_input(tmp_path_factory):
    root = tmp_path_factory.mktemp("input")
    checkpoint = seed_checkpoint(root / "ckpt", seed=2)
    store = LocalStore(root / "store")
    return store, checkpoint, upload_checkpoint(store, checkpoint, "inputs/seed.tar")


def test_bad_events_go_to_the_dead_letter_topic_and_the_service_keeps_serving(stored_input):
    store, checkpoint, good_ref = stored_input
    bus = InMemoryBus()
    topic = TOPICS.phase_input("fabric_scale")

    missing_ref = altered(good_ref, uri=good_ref.uri.replace("inputs/seed.tar", "inputs/later.tar"))
    wrong_sha_ref = altered(good_ref, sha256="f" * 64)
    future = scale_event("run-future", good_ref, 0.5)
    future.schema_version = 2

    def check_first_round():
        letters = [DeadLetter.from_record(r) for r in bus.records[TOPICS.dlq]]
        assert [letter.reason for letter in letters] == [
            FailureReason.UNDECODABLE,
            FailureReason.UNKNOWN_SCHEMA_VERSION,
            FailureReason.MISSING_CHECKPOINT,
            FailureReason.SHA256_MISMATCH,
        ]
        assert [letter.original_offset for letter in letters] == [0, 1, 2, 3]
        assert all(letter.original_topic == topic and letter.phase == "fabric_scale" for letter in letters)
        assert [letter.attempts for letter in letters] == [1, 1, FAST_RETRY.attempts, 1]  # only the missing one retried
        assert "later.tar" in letters[2].error and "SHA-256" in letters[3].error
        assert letters[0].record.value == bus.records[topic][0].value  # the dead letter keeps the original bytes
        runs = events_of(bus, TOPICS.runs)
        failed = {e.run_id: e.phase_failed.reason for e in runs if e.WhichOneof("payload") == "phase_failed"}
        assert failed == {"run-missing": "missing_checkpoint", "run-sha": "sha256_mismatch"}
        assert [e.run_id for e in runs if e.WhichOneof("payload") == "pipeline_completed"] == ["run-good"]

    def fix_the_cause():  # the missing checkpoint arrives
        with tempfile.TemporaryDirectory() as tmp:
            tar_path = Path(tmp) / "c.tar"
            sha256 = pack_checkpoint(checkpoint, tar_path)
            assert sha256 == good_ref.sha256
            store.put_file("inputs/later.tar", tar_path, sha256)

    async def scenario():
        worker = PhaseWorker(SCALE, bus, store, retry=FAST_RETRY)
        await bus.publish(topic, b"\x00\xffthis is not an envelope", key="run-garbage")
        await bus.publish(topic, future.SerializeToString(), key="run-future")
        await publish_envelope(bus, topic, scale_event("run-missing", missing_ref, 0.25), [])
        await publish_envelope(bus, topic, scale_event("run-sha", wrong_sha_ref, 0.5), [])
        await publish_envelope(bus, topic, scale_event("run-good", good_ref, 0.5), [])
        await serve_until_idle(worker, bus)
        check_first_round()
        fix_the_cause()
        redriven = await redrive_dead_letters(bus, TOPICS, idle_s=0.05)
        await serve_until_idle(worker, bus)
        again = await redrive_dead_letters(bus, TOPICS, idle_s=0.05)  # each letter is redriven once
        return redriven, again

    redriven, again = asyncio.run(scenario())
    assert len(redriven) == 4
    runs = events_of(bus, TOPICS.runs)
    assert sorted(e.run_id for e in runs if e.WhichOneof("payload") == "pipeline_completed") == ["run-good", "run-missing"]
    new_letters = [DeadLetter.from_record(r) for r in bus.records[TOPICS.dlq][4:]]
    assert sorted(letter.reason for letter in new_letters) == sorted(
        [FailureReason.UNDECODABLE, FailureReason.UNKNOWN_SCHEMA_VERSION, FailureReason.SHA256_MISMATCH]
    )
    assert len(again) == 3  # only the letters that failed again
    for record in bus.records[TOPICS.dlq][4:]:  # redrive strips the old dead-letter headers first
        names = [name for name, _ in record.headers if name.startswith("x-agentforge-")]
        assert len(names) == len(set(names))


def test_redrive_of_a_cause_not_fixed_does_not_loop(stored_input):
    store, _, _ = stored_input
    bus = InMemoryBus()
    topic = TOPICS.phase_input("fabric_scale")

    async def scenario():
        worker = PhaseWorker(SCALE, bus, store, retry=FAST_RETRY)
        await bus.publish(topic, b"still garbage", key="run-garbage")
        await serve_until_idle(worker, bus)
        stop = asyncio.Event()
        serving = asyncio.create_task(worker.serve(stop, poll_s=0.02))  # fails each redriven letter at once
        try:
            redriven = await asyncio.wait_for(redrive_dead_letters(bus, TOPICS, idle_s=0.3), timeout=20)
        finally:
            stop.set()
            await serving
        later = await redrive_dead_letters(bus, TOPICS, idle_s=0.05)  # the new letter waits for the next redrive
        return redriven, later

    redriven, later = asyncio.run(scenario())
    assert len(redriven) == 1 and len(later) == 1
    assert len(bus.records[TOPICS.dlq]) == 2


def test_cancelled_run_abandons_its_phase_at_the_next_progress_report(tmp_path):
    # Ctrl-C on `agentforge run` cancels the run; the phase's thread must stop too, not train on for minutes.
    (endless,) = spec_for(Endless)

    async def start_then_cancel():
        run = asyncio.create_task(run_embedded_async(pipeline_spec([(endless, {})]), store=LocalStore(tmp_path)))
        while not Endless.started.is_set():
            assert not run.done(), run.result()
            await asyncio.sleep(0.02)
        cancelled_at = time.monotonic()
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        return time.monotonic() - cancelled_at

    assert asyncio.run(start_then_cancel()) < 5  # the phase would keep it busy for a minute
    assert Endless.exited.wait(timeout=5)


def test_module_phases_are_refused_unless_allowed(tmp_path, monkeypatch):
    # A step's phase comes from events and gRPC requests; naming a module must not get it imported.
    (tmp_path / "module_with_side_effect.py").write_text(
        "from pathlib import Path\nPath(__file__).with_suffix('.imported').touch()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("AGENTFORGE_ALLOW_MODULE_PHASES", "false")
    with pytest.raises(LookupError, match="module phases are off"):
        load_phase("module_with_side_effect:Anything")
    assert not (tmp_path / "module_with_side_effect.imported").exists()
    monkeypatch.setenv("AGENTFORGE_ALLOW_MODULE_PHASES", "true")
    with pytest.raises(LookupError, match="cannot load phase"):
        load_phase("module_with_side_effect:Anything")
    assert (tmp_path / "module_with_side_effect.imported").exists()
