"""The phase runtime on the embedded backends: a run end to end, redelivery, dead letters, redrive, traces."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.contracts.agentforge.v1 import events_pb2
from shared.fabric.dlq import DeadLetter, LetterFilter, list_dead_letters, purge_dead_letters, redrive_dead_letters
from shared.fabric.embedded import run_embedded, run_embedded_async
from shared.fabric.events import FailureReason, decode_envelope, new_envelope, pipeline_spec
from shared.fabric.local_store import LocalStore
from shared.fabric.phases import load_phase
from shared.fabric.memory_bus import InMemoryBus
from shared.fabric.pipeline import check_spec, publish_envelope
from shared.fabric.topics import Topics
from shared.fabric.tracing import tracer_provider
from shared.fabric.transport import download_checkpoint, pack_checkpoint, upload_checkpoint
from shared.fabric.retry import RetryPolicy
from shared.fabric.worker import PhaseWorker
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


def test_redelivered_event_is_not_handed_on_twice_and_a_replay_reuses_the_output(finished_run):
    result, store, root, _ = finished_run
    spec = three_step_spec(root / "invocations.log")
    ready = events_pb2.ModelReady(spec=spec, step=2, inputs=result.steps[1].outputs)
    bus = InMemoryBus()

    async def redeliver_twice_then_replay():
        worker = PhaseWorker(FINETUNE, bus, store)
        redelivered = new_envelope(result.run_id, "test", model_ready=ready)
        for _ in range(2):  # the same event twice, as after a crash between publishing and committing
            await publish_envelope(bus, TOPICS.phase_input("fabric_finetune"), redelivered, [])
        await publish_envelope(bus, TOPICS.phase_input("fabric_finetune"),
                               new_envelope("replay-run", "test", model_ready=ready), [])
        await serve_until_idle(worker, bus)

    asyncio.run(redeliver_twice_then_replay())
    assert (root / "invocations.log").read_text().count("\n") == 1  # the transform ran once, in the first run
    runs = events_of(bus, TOPICS.runs)
    completed = [e for e in runs if e.WhichOneof("payload") == "phase_completed"]
    assert [e.run_id for e in completed] == ["replay-run"] and completed[0].phase_completed.reused
    assert completed[0].phase_completed.outputs[0].digest == result.outputs[0].digest
    assert [e.run_id for e in runs if e.WhichOneof("payload") == "pipeline_completed"] == ["replay-run"]
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
        assert [letter.attempts for letter in letters] == [1, 1, 1, 1]  # none of these can be fixed by a retry
        assert "later.tar" in letters[2].error and "SHA-256" in letters[3].error
        assert letters[0].record.value == bus.records[topic][0].value  # the dead letter keeps the original bytes
        runs = events_of(bus, TOPICS.runs)
        failed = {e.run_id: e.phase_failed.reason for e in runs if e.WhichOneof("payload") == "phase_failed"}
        assert failed == {"run-garbage": "undecodable", "run-future": "unknown_schema_version",
                          "run-missing": "missing_checkpoint", "run-sha": "sha256_mismatch"}
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
        failed_again = await list_dead_letters(bus, TOPICS, idle_s=0.05)
        again = await redrive_dead_letters(bus, TOPICS, idle_s=0.05)  # each letter is redriven once
        return redriven, failed_again, again

    redriven, failed_again, again = asyncio.run(scenario())
    assert len(redriven) == 4
    runs = events_of(bus, TOPICS.runs)
    assert sorted(e.run_id for e in runs if e.WhichOneof("payload") == "pipeline_completed") == ["run-good", "run-missing"]
    assert sorted(letter.reason for letter in failed_again) == sorted(
        [FailureReason.UNDECODABLE, FailureReason.UNKNOWN_SCHEMA_VERSION, FailureReason.SHA256_MISMATCH]
    )
    assert len(again) == 3  # only the letters that failed again
    for record in [letter.record for letter in failed_again]:  # redrive strips the old dead-letter headers first
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
        return redriven, later, await list_dead_letters(bus, TOPICS, idle_s=0.05, include_settled=True)

    redriven, later, letters = asyncio.run(scenario())
    assert len(redriven) == 1 and len(later) == 1
    assert len(letters) == 2


def test_redrive_and_purge_take_the_letters_selected_by_run_reason_or_offset(stored_input):
    store, _, good_ref = stored_input
    bus = InMemoryBus()
    topic = TOPICS.phase_input("fabric_scale")
    missing_ref = altered(good_ref, uri=good_ref.uri.replace("inputs/seed.tar", "inputs/never.tar"))

    async def scenario():
        worker = PhaseWorker(SCALE, bus, store, retry=FAST_RETRY)
        for run_id in ("run-a", "run-b", "run-c"):
            await bus.publish(topic, b"\x00not an envelope", key=run_id)
        await publish_envelope(bus, topic, scale_event("run-d", missing_ref, 0.5), [])
        await serve_until_idle(worker, bus)

        def waiting():
            return list_dead_letters(bus, TOPICS, idle_s=0.05)

        steps = {"listed": [letter.run_id for letter in await waiting()]}
        steps["redriven by run"] = [x.run_id for x in await redrive_dead_letters(bus, TOPICS, 0.05, LetterFilter(run_id="run-a"))]
        steps["purged by reason"] = [x.run_id for x in await purge_dead_letters(bus, TOPICS, 0.05, LetterFilter(reason="undecodable"))]
        steps["redriven by offset"] = [x.run_id for x in await redrive_dead_letters(bus, TOPICS, 0.05, LetterFilter(offset="0:3"))]
        steps["left"] = [letter.run_id for letter in await waiting()]
        return steps

    assert asyncio.run(scenario()) == {
        "listed": ["run-a", "run-b", "run-c", "run-d"],
        "redriven by run": ["run-a"],
        "purged by reason": ["run-b", "run-c"],
        "redriven by offset": ["run-d"],
        "left": [],
    }
    assert [r.key for r in bus.records[topic][4:]] == [b"run-a", b"run-d"]  # back on the phase's topic


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


def test_a_spec_naming_an_unregistered_phase_is_refused_at_the_start_and_dead_lettered_at_a_service(stored_input):
    store, _, good_ref = stored_input
    for unknown in ("No Such Phase!", "nosuchphase"):
        with pytest.raises(LookupError):  # StartPipeline refuses it
            check_spec(pipeline_spec([(SCALE, {}), (unknown, {})]))
    bus = InMemoryBus()
    topic = TOPICS.phase_input("fabric_scale")

    def event(run_id: str, next_phase: str | None):
        steps = [(SCALE, {"factor": 0.5})] + ([(next_phase, {})] if next_phase else [])
        ready = events_pb2.ModelReady(spec=pipeline_spec(steps), step=0, inputs=[good_ref])
        return new_envelope(run_id, "test", model_ready=ready)

    async def scenario():
        worker = PhaseWorker(SCALE, bus, store, retry=FAST_RETRY)
        for run_id, next_phase in [("run-upper", "No Such Phase!"), ("run-lower", "nosuchphase"), ("run-fine", None)]:
            await publish_envelope(bus, topic, event(run_id, next_phase), [])
        await serve_until_idle(worker, bus)  # every record committed: none blocks the partition

    asyncio.run(scenario())
    letters = [DeadLetter.from_record(r) for r in bus.records[TOPICS.dlq]]
    assert [(letter.run_id, letter.reason) for letter in letters] == [
        ("run-upper", FailureReason.INVALID_SPEC), ("run-lower", FailureReason.INVALID_SPEC)]
    assert "nosuchphase" in letters[1].error and "registered phases" in letters[1].error
    assert set(bus.records) == {topic, TOPICS.runs, TOPICS.dlq}  # no event went to a topic nobody serves
    runs = events_of(bus, TOPICS.runs)
    assert [e.run_id for e in runs if e.WhichOneof("payload") == "pipeline_completed"] == ["run-fine"]
    assert not any(e.run_id != "run-fine" and e.WhichOneof("payload") == "phase_completed" for e in runs)


class _RefusingBus(InMemoryBus):
    """Publishing to one topic fails: a broker that refuses that topic's records."""

    def __init__(self, refused_topic: str) -> None:
        super().__init__()
        self.refused_topic = refused_topic

    async def publish(self, topic, value, *, key, headers=None):
        if topic == self.refused_topic:
            raise RuntimeError(f"the broker refuses {topic}")
        await super().publish(topic, value, key=key, headers=headers)


def test_a_failure_to_publish_the_next_event_ends_in_a_dead_letter_and_a_commit(stored_input):
    store, _, good_ref = stored_input
    bus = _RefusingBus(TOPICS.phase_input("fabric_finetune"))
    spec = pipeline_spec([(SCALE, {"factor": 0.25}), (FINETUNE, {})])
    ready = events_pb2.ModelReady(spec=spec, step=0, inputs=[good_ref])

    async def scenario():
        worker = PhaseWorker(SCALE, bus, store, retry=FAST_RETRY)
        await publish_envelope(bus, TOPICS.phase_input("fabric_scale"), new_envelope("run-x", "test", model_ready=ready), [])
        await serve_until_idle(worker, bus)

    asyncio.run(scenario())
    (letter,) = [DeadLetter.from_record(r) for r in bus.records[TOPICS.dlq]]
    assert letter.reason == FailureReason.PHASE_ERROR and "refuses" in letter.error
    assert letter.attempts == FAST_RETRY.attempts
    failed = [e.phase_failed for e in events_of(bus, TOPICS.runs) if e.WhichOneof("payload") == "phase_failed"]
    assert [f.reason for f in failed] == [FailureReason.PHASE_ERROR]


class _OutageStore(LocalStore):
    """A store whose server is unreachable until `back_at` (time.monotonic())."""

    def __init__(self, root: Path, down_s: float) -> None:
        super().__init__(root)
        self.back_at, self.refused = time.monotonic() + down_s, 0

    def _check(self) -> None:
        if time.monotonic() < self.back_at:
            self.refused += 1
            raise ConnectionRefusedError("[Errno 111] Connection refused")

    def put_file(self, *args, **kwargs):
        self._check()
        return super().put_file(*args, **kwargs)

    def get_file(self, *args, **kwargs):
        self._check()
        return super().get_file(*args, **kwargs)

    def put_bytes(self, *args, **kwargs):
        self._check()
        return super().put_bytes(*args, **kwargs)

    def get_bytes(self, *args, **kwargs):
        self._check()
        return super().get_bytes(*args, **kwargs)

    def stat_uri(self, *args, **kwargs):
        self._check()
        return super().stat_uri(*args, **kwargs)


@pytest.mark.parametrize("down_s, window_s, completes", [(1.5, 30.0, True), (30.0, 1.0, False)])
def test_an_object_store_outage_is_waited_out_for_the_retry_window(stored_input, tmp_path, down_s, window_s, completes):
    _, checkpoint, _ = stored_input
    store = LocalStore(tmp_path)
    ref = upload_checkpoint(store, checkpoint, "inputs/seed.tar")
    outage = _OutageStore(tmp_path, down_s)
    bus = InMemoryBus()
    # More attempts than FAST_RETRY allows a phase's own error: the window decides, not the count.
    retry = RetryPolicy(attempts=2, initial_s=0.05, max_s=0.2, transient_window_s=window_s)

    async def scenario():
        worker = PhaseWorker(SCALE, bus, outage, retry=retry)
        await publish_envelope(bus, TOPICS.phase_input("fabric_scale"), scale_event("run-outage", ref, 0.5), [])
        await serve_until_idle(worker, bus)

    asyncio.run(scenario())
    assert outage.refused > retry.attempts
    kinds = [e.WhichOneof("payload") for e in events_of(bus, TOPICS.runs)]
    letters = [DeadLetter.from_record(r) for r in bus.records[TOPICS.dlq]]
    if completes:
        assert "pipeline_completed" in kinds and not letters
    else:
        assert "pipeline_completed" not in kinds
        assert [letter.reason for letter in letters] == [FailureReason.INFRASTRUCTURE]


def test_temporary_folders_of_dead_processes_are_removed_at_start(stored_input, tmp_path):
    store, _, _ = stored_input
    exited = subprocess.Popen(["true"])
    exited.wait()
    alive = os.getppid()
    folders = {
        "dead": tmp_path / f"agentforge-fabric_scale-{exited.pid}-abc",
        "own": tmp_path / f"agentforge-fabric_scale-{os.getpid()}-def",  # a restarted container keeps pid 1
        "alive": tmp_path / f"agentforge-fabric_scale-{alive}-ghi",
        "other phase": tmp_path / f"agentforge-fabric_seed-{exited.pid}-jkl",
    }
    for folder in folders.values():
        (folder / "in").mkdir(parents=True)
    PhaseWorker(SCALE, InMemoryBus(), store, work_dir=tmp_path).remove_stale_work_dirs()
    assert {name for name, folder in folders.items() if folder.exists()} == {"alive", "other phase"}


class _LateMarkerStore(LocalStore):
    """The completion marker looks absent when first read, as when another writer is still at work."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.hidden = True

    def get_bytes(self, key):
        if self.hidden and key.endswith("completed.pb"):
            self.hidden = False
            return None
        return super().get_bytes(key)


def test_of_two_writers_of_one_output_the_first_wins_and_the_second_hands_on_its_outputs(stored_input, tmp_path):
    _, checkpoint, _ = stored_input
    store = _LateMarkerStore(tmp_path)
    ref = upload_checkpoint(store, checkpoint, "inputs/seed.tar")
    bus = InMemoryBus()

    def rename_the_first_writers_archive():
        """As if the first writer's bytes differed from the second's (a manifest with other timings)."""
        (marker_path,) = (store.root / "outputs" / "fabric_scale").glob("*/completed.pb")
        marker = events_pb2.PhaseCompleted.FromString(marker_path.read_bytes())
        archive = Path(marker.outputs[0].uri.removeprefix("file://"))
        renamed = archive.with_name("00-seed-0-first-writer.tar")
        archive.rename(renamed)
        archive.with_name(archive.name + ".sha256").rename(renamed.with_name(renamed.name + ".sha256"))
        marker.outputs[0].uri = renamed.as_uri()
        store.put_bytes(str(marker_path.relative_to(store.root)), marker.SerializeToString())

    async def scenario():
        worker = PhaseWorker(SCALE, bus, store, retry=FAST_RETRY)
        store.hidden = False
        await publish_envelope(bus, TOPICS.phase_input("fabric_scale"), scale_event("run-first", ref, 0.5), [])
        await serve_until_idle(worker, bus)
        rename_the_first_writers_archive()
        store.hidden = True  # the second run of the same input and config does the work as well
        await publish_envelope(bus, TOPICS.phase_input("fabric_scale"), scale_event("run-second", ref, 0.5), [])
        await serve_until_idle(worker, bus)

    asyncio.run(scenario())
    completed = {e.run_id: e.phase_completed for e in events_of(bus, TOPICS.runs) if e.WhichOneof("payload") == "phase_completed"}
    assert not completed["run-first"].reused and completed["run-second"].reused
    assert completed["run-second"].outputs[0].uri.endswith("/00-seed-0-first-writer.tar")  # the winner's
    (output,) = (store.root / "outputs" / "fabric_scale").iterdir()  # its own archive deleted, the winner's kept
    assert sorted(p.name for p in output.iterdir() if not p.name.endswith(".sha256")) == [
        "00-seed-0-first-writer.tar", "completed.pb"]
