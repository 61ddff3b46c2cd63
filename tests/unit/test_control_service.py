"""The control service over real gRPC on 127.0.0.1, with embedded backends: in-process bus, local store,
phase workers in this process, the in-process status view. Runs tiny real pipelines (tests/fabric_phases)."""
from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import urlparse

import grpc
import pytest

from shared.checkpoint import sha256_file
from shared.contracts.agentforge.v1 import control_pb2, control_pb2_grpc
from shared.fabric.control import ControlServicer, EmbeddedWorkers, start_control_server
from shared.fabric.events import pipeline_spec
from shared.fabric.local_store import LocalStore
from shared.fabric.memory_bus import InMemoryBus
from shared.fabric.status_view import MemoryStatusView, RunArchive
from shared.fabric.topics import Topics
from tests.fabric_phases import ScaleWeights, SeedModel, spec_for

pytestmark = pytest.mark.unit

SEED, SCALE = spec_for(SeedModel, ScaleWeights)
SPEC = pipeline_spec([(SEED, {"seed": 3}), (SCALE, {"factor": 0.5})], name="tiny")


async def with_control(tmp_path: Path, scenario):
    topics = Topics()
    bus = InMemoryBus()
    view = MemoryStatusView(bus, topics, archive=RunArchive(tmp_path / "runs"))
    workers = EmbeddedWorkers(bus, LocalStore(tmp_path / "store"), topics)
    await view.start()
    servicer = ControlServicer(bus, view, topics, prepare=workers.ensure)
    server, port = await start_control_server(servicer, "127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            return await asyncio.wait_for(scenario(control_pb2_grpc.ControlServiceStub(channel)), timeout=120)
    finally:
        await server.stop(grace=1)
        await workers.close()
        await view.stop()


async def watch_to_end(stub, run_id: str) -> list[str]:
    return [e.WhichOneof("payload") async for e in stub.WatchRun(control_pb2.WatchRunRequest(run_id=run_id))]


def test_start_watch_get_list_and_replay_a_real_pipeline(tmp_path):
    async def scenario(stub):
        started = await stub.StartPipeline(control_pb2.StartPipelineRequest(spec=SPEC))
        kinds = await watch_to_end(stub, started.run_id)
        status = await stub.GetRun(control_pb2.GetRunRequest(run_id=started.run_id))
        replayed = await stub.Replay(control_pb2.ReplayRequest(run_id=started.run_id, from_phase="fabric_scale"))
        await watch_to_end(stub, replayed.run_id)
        replay_status = await stub.GetRun(control_pb2.GetRunRequest(run_id=replayed.run_id))
        listed = await stub.ListRuns(control_pb2.ListRunsRequest(page_size=1))
        rest = await stub.ListRuns(control_pb2.ListRunsRequest(page_size=1, page_token=listed.next_page_token))
        return started.run_id, kinds, status, replayed.run_id, replay_status, listed, rest

    run_id, kinds, status, replay_id, replay_status, listed, rest = asyncio.run(with_control(tmp_path, scenario))

    assert kinds[0] == "pipeline_started" and kinds[-1] == "pipeline_completed"
    assert kinds.count("phase_completed") == 2 and "phase_progress" in kinds
    assert status.state == control_pb2.RUN_STATE_COMPLETED
    assert [c.phase for c in status.completed_steps] == ["fabric_seed", "fabric_scale"]
    report = status.completed_steps[1].report_json
    assert '"norm_after"' in report and '"norm_before"' in report
    (output,) = status.outputs
    assert sha256_file(Path(urlparse(output.uri).path)) == output.sha256  # the stored checkpoint is whole

    # The replay is a new run of the remaining step from the stored output of the step before; same input,
    # code and config, so the deterministic output key finds the stored result and reuses it.
    assert replay_id != run_id
    assert replay_status.state == control_pb2.RUN_STATE_COMPLETED
    assert [s.phase for s in replay_status.spec.steps] == [SCALE]
    assert list(replay_status.spec.inputs) == list(status.completed_steps[0].outputs)
    assert replay_status.completed_steps[0].reused
    assert replay_status.outputs[0].digest == output.digest

    assert [r.run_id for r in listed.runs] == [replay_id] and listed.next_page_token
    assert [r.run_id for r in rest.runs] == [run_id] and not rest.next_page_token
    assert RunArchive(tmp_path / "runs").load(run_id) == status  # `agentforge status` reads this later


def test_bad_requests_get_clear_status_codes(tmp_path):
    async def code_of(call) -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        return caught.value.code(), caught.value.details()

    async def scenario(stub):
        codes = {
            "unknown run": await code_of(stub.GetRun(control_pb2.GetRunRequest(run_id="nope"))),
            "no run id": await code_of(stub.GetRun(control_pb2.GetRunRequest())),
            "unknown phase": await code_of(stub.StartPipeline(control_pb2.StartPipelineRequest(
                spec=pipeline_spec([("no_such_phase", {})])))),
            "empty spec": await code_of(stub.StartPipeline(control_pb2.StartPipelineRequest())),
            "bad token": await code_of(stub.ListRuns(control_pb2.ListRunsRequest(page_token="x"))),
        }
        await stub.StartPipeline(control_pb2.StartPipelineRequest(spec=SPEC, run_id="mine"))
        codes["duplicate"] = await code_of(stub.StartPipeline(control_pb2.StartPipelineRequest(spec=SPEC, run_id="mine")))
        codes["replay unknown phase"] = await code_of(stub.Replay(control_pb2.ReplayRequest(run_id="mine", from_phase="bitnet")))
        await watch_to_end(stub, "mine")
        return codes

    codes = asyncio.run(with_control(tmp_path, scenario))
    assert codes["unknown run"][0] == grpc.StatusCode.NOT_FOUND
    assert codes["no run id"][0] == grpc.StatusCode.INVALID_ARGUMENT
    assert codes["unknown phase"][0] == grpc.StatusCode.INVALID_ARGUMENT and "no_such_phase" in codes["unknown phase"][1]
    assert codes["empty spec"][0] == grpc.StatusCode.INVALID_ARGUMENT
    assert codes["bad token"][0] == grpc.StatusCode.INVALID_ARGUMENT
    assert codes["duplicate"][0] == grpc.StatusCode.ALREADY_EXISTS
    assert codes["replay unknown phase"][0] == grpc.StatusCode.FAILED_PRECONDITION
    assert "fabric_scale" in codes["replay unknown phase"][1]


def test_a_gated_out_run_is_replayed_with_a_corrected_spec(tmp_path):
    card = {"split": "validation", "tasks": [["arithmetic", 1, 4]], "max_new_tokens": 3, "max_length": 32}
    steps = [(SEED, {"seed": 3}), (SCALE, {"factor": 0.5})]
    gated = pipeline_spec(steps, name="gated", gates={1: {"floor": 1.01, "scorecard": card}})
    fixed = pipeline_spec(steps, name="gated", gates={1: {"floor": 0.0, "scorecard": card}})

    async def scenario(stub):
        started = await stub.StartPipeline(control_pb2.StartPipelineRequest(spec=gated))
        kinds = await watch_to_end(stub, started.run_id)
        failed = await stub.GetRun(control_pb2.GetRunRequest(run_id=started.run_id))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Replay(control_pb2.ReplayRequest(run_id=started.run_id, from_phase="fabric_scale",
                                                        spec=pipeline_spec([(SEED, {"seed": 3})])))
        replayed = await stub.Replay(control_pb2.ReplayRequest(run_id=started.run_id, from_phase="fabric_scale", spec=fixed))
        await watch_to_end(stub, replayed.run_id)
        return kinds, failed, refused.value, await stub.GetRun(control_pb2.GetRunRequest(run_id=replayed.run_id))

    kinds, failed, refused, replay = asyncio.run(with_control(tmp_path, scenario))
    assert kinds[-1] == "phase_failed" and "pipeline_completed" not in kinds
    assert failed.state == control_pb2.RUN_STATE_FAILED and failed.failure.reason == "gate_failed"
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION and "not the run's" in refused.details()
    assert replay.state == control_pb2.RUN_STATE_COMPLETED
    assert '"passed": true' in replay.completed_steps[0].report_json
    assert list(replay.spec.inputs) == list(failed.completed_steps[0].outputs)  # the seed is not rerun
