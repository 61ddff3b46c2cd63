"""The run-status fold: in order, out of order and duplicated events give one status; both feeds use it."""
from __future__ import annotations

import asyncio
import itertools
import random

import pytest

from shared.contracts.agentforge.v1 import checkpoint_pb2, control_pb2, events_pb2
from shared.fabric.events import new_envelope, pipeline_spec
from shared.fabric.memory_bus import InMemoryBus
from shared.fabric.pipeline import publish_envelope
from shared.fabric.status_view import FaustStatusView, MemoryStatusView, RunArchive, fold, is_terminal
from shared.fabric.topics import Topics
from shared.settings import Settings

pytestmark = pytest.mark.unit

RUN = "run-1"
SPEC = pipeline_spec([("fabric_seed", {"seed": 1}), ("fabric_scale", {"factor": 0.5})], name="tiny")


def at(envelope, second: int):
    envelope.created_at.FromSeconds(1_700_000_000 + second)
    return envelope


def ref(name: str) -> checkpoint_pb2.CheckpointRef:
    return checkpoint_pb2.CheckpointRef(uri=f"file:///store/{name}", sha256=name * 4, name=name)


def completed(step: int, phase: str, output: str, reused: bool = False):
    done = events_pb2.PhaseCompleted(step=step, phase=phase, outputs=[ref(output)], reused=reused)
    return done


def progress(step: int, phase: str, fraction: float, message: str):
    return events_pb2.PhaseProgress(step=step, phase=phase, fraction=fraction, message=message)


def start_event(run_id: str = RUN):
    return new_envelope(run_id, "control", pipeline_started=events_pb2.PipelineStarted(spec=SPEC))


def successful_run() -> list:
    return [
        at(start_event(), 0),
        at(new_envelope(RUN, "seed", phase_progress=progress(0, "fabric_seed", 0.0, "started")), 1),
        at(new_envelope(RUN, "seed", phase_progress=progress(0, "fabric_seed", 1.0, "created")), 2),
        at(new_envelope(RUN, "seed", phase_completed=completed(0, "fabric_seed", "a")), 3),
        at(new_envelope(RUN, "scale", phase_progress=progress(1, "fabric_scale", 0.5, "half")), 4),
        at(new_envelope(RUN, "scale", phase_completed=completed(1, "fabric_scale", "b")), 5),
        at(new_envelope(RUN, "scale", pipeline_completed=events_pb2.PipelineCompleted(outputs=[ref("b")])), 6),
    ]


def fold_all(events) -> control_pb2.RunStatus:
    status = None
    for envelope in events:
        status = fold(status, envelope)
    return status


def test_in_order_run_folds_to_completed_with_outputs():
    status = fold_all(successful_run())
    assert status.run_id == RUN
    assert status.state == control_pb2.RUN_STATE_COMPLETED
    assert status.spec == SPEC
    assert [(c.step, c.phase) for c in status.completed_steps] == [(0, "fabric_seed"), (1, "fabric_scale")]
    assert [o.name for o in status.outputs] == ["b"]
    assert (status.current_step, status.current_fraction) == (1, 1.0)
    assert status.started_at.seconds == 1_700_000_000
    assert status.updated_at.seconds == 1_700_000_006
    assert not status.HasField("failure")


def test_partial_run_is_running_at_its_furthest_position():
    status = fold_all(successful_run()[:5])
    assert status.state == control_pb2.RUN_STATE_RUNNING
    assert (status.current_step, status.current_fraction, status.message) == (1, 0.5, "half")


def test_any_order_and_duplicates_give_the_same_status():
    events = successful_run()
    expected = fold_all(events)
    rng = random.Random(0)
    orders = [list(p) for p in itertools.islice(itertools.permutations(events), 0, 5040, 97)]
    orders.append(events + events[2:5])  # redelivered after a crash
    for order in orders:
        rng.shuffle(order)
        assert fold_all(order) == expected


def test_failure_shows_until_the_failed_step_completes_after_a_redrive():
    started, *_ = successful_run()
    failed = at(new_envelope(RUN, "scale", phase_failed=events_pb2.PhaseFailed(
        step=1, phase="fabric_scale", reason="phase_error", error="boom", attempts=3)), 4)
    seed_done = at(new_envelope(RUN, "seed", phase_completed=completed(0, "fabric_seed", "a")), 3)
    status = fold_all([started, seed_done, failed])
    assert status.state == control_pb2.RUN_STATE_FAILED
    assert (status.failure.phase, status.failure.reason, status.failure.attempts) == ("fabric_scale", "phase_error", 3)

    redriven = at(new_envelope(RUN, "scale", phase_completed=completed(1, "fabric_scale", "b")), 9)
    for order in ([started, seed_done, failed, redriven], [redriven, failed, seed_done, started]):
        status = fold_all(order)
        assert status.state == control_pb2.RUN_STATE_RUNNING
        assert not status.HasField("failure")


def test_reused_redelivery_does_not_replace_the_real_step_record():
    started, *_ = successful_run()
    real = at(new_envelope(RUN, "seed", phase_completed=completed(0, "fabric_seed", "a")), 3)
    again = at(new_envelope(RUN, "seed", phase_completed=completed(0, "fabric_seed", "a", reused=True)), 8)
    for order in ([started, real, again], [again, real, started]):
        status = fold_all(order)
        assert len(status.completed_steps) == 1 and not status.completed_steps[0].reused


def test_memory_view_folds_the_bus_and_archives_for_other_processes(tmp_path):
    topics = Topics()

    async def scenario():
        bus = InMemoryBus()
        view = MemoryStatusView(bus, topics, archive=RunArchive(tmp_path))
        await view.start()
        for envelope in successful_run():
            await publish_envelope(bus, topics.runs, envelope, [])
        await publish_envelope(bus, topics.runs, at(start_event("run-0"), -5), [])
        await bus.publish(topics.runs, b"not an envelope", key="junk")
        status = await view.wait_for(RUN, timeout_s=5)
        for _ in range(50):
            if view.get(RUN).state == control_pb2.RUN_STATE_COMPLETED and view.get("run-0"):
                break
            await asyncio.sleep(0.05)
        await view.stop()
        return status

    asyncio.run(scenario())
    archived = RunArchive(tmp_path)
    assert archived.load(RUN) == fold_all(successful_run())
    assert [s.run_id for s in archived.all()] == ["run-0", RUN]
    # Read back by a fresh view with an empty bus, as `agentforge status` in another process would.
    fresh = MemoryStatusView(InMemoryBus(), topics, archive=archived)
    assert [s.run_id for s in fresh.runs()] == [RUN, "run-0"]  # newest first
    assert fresh.get("nope") is None
    with pytest.raises(ValueError):
        archived.load("../escape")


def test_faust_table_folds_events_keyed_by_run_id():
    """The distributed feed's agent, driven through faust's in-memory test context (no broker)."""
    settings = Settings(kafka_bootstrap="127.0.0.1:1")

    async def scenario():
        view = FaustStatusView(settings, runs_partitions=3)
        assert view.app.conf.web_enabled is False and view.app.conf.web_bind == "127.0.0.1"
        assert view.table.partitions == 3 and view.source.partitions == 3
        assert view.table.value_serializer == "raw"  # serialized RunStatus, restored byte for byte
        view.app.finalize()
        view.app.flow_control.resume()
        events = successful_run()
        async with view.agent.test_context() as agent:
            for envelope in [events[0], *reversed(events[1:])]:
                await agent.put(envelope.SerializeToString(), key=RUN.encode(), partition=1)
            await agent.put(b"garbage", key=b"junk", partition=2)
        return view.get(RUN), view.runs(), view.get("junk")

    status, runs, junk = asyncio.run(scenario())
    assert status == fold_all(successful_run())
    assert [s.run_id for s in runs] == [RUN]
    assert junk is None


def test_a_watch_until_completed_goes_on_past_a_failure():
    failed = new_envelope(RUN, "scale", phase_failed=events_pb2.PhaseFailed(step=1, phase="scale", reason="phase_error"))
    completed = new_envelope(RUN, "scale", pipeline_completed=events_pb2.PipelineCompleted())
    assert is_terminal(failed) and is_terminal(completed)
    assert not is_terminal(failed, until_completed=True) and is_terminal(completed, until_completed=True)
