"""The control service (gRPC): start, inspect, watch and replay runs.

Runs are choreographed over the bus; this service only emits a run's start events (through
shared.fabric.pipeline.start_pipeline) and reads the run-status view (shared.fabric.status_view). It
serves /healthz and /readyz on Settings.health_addr (shared.fabric.health) for the probes.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from shared.contracts.agentforge.v1 import control_pb2, control_pb2_grpc, events_pb2, pipeline_pb2
from shared.fabric.bus import Bus
from shared.fabric.events import BadEvent, decode_envelope
from shared.fabric.health import start_health_server
from shared.fabric.kafka_bus import KafkaBus
from shared.fabric.local_store import LocalStore
from shared.fabric.memory_bus import InMemoryBus
from shared.fabric.phases import phase_name
from shared.fabric.pipeline import start_pipeline
from shared.fabric.status_view import (
    FaustStatusView,
    MemoryStatusView,
    RunArchive,
    StatusView,
    is_terminal,
    runs_topic_partitions,
)
from shared.fabric.storage import ObjectStore
from shared.fabric.topics import Topics
from shared.fabric.tracing import tracer_provider as make_tracer_provider
from shared.fabric.worker import PhaseWorker
from shared.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
# How long GetRun/WatchRun/Replay wait for the view to fold a run that was just started.
SEEN_TIMEOUT_S = 10.0


class ReplayError(ValueError):
    """The run cannot be replayed from that phase (unknown phase, or no stored output before it)."""


def replay_spec(status: control_pb2.RunStatus, from_phase: str,
                corrected: pipeline_pb2.PipelineSpec | None = None) -> pipeline_pb2.PipelineSpec:
    """The rest of the run's spec from `from_phase`, starting from the stored outputs of the step before;
    the remaining steps come from `corrected` where given (a fixed gate or config, the same phases).

    A replay is a new run of the remaining steps. Output keys are deterministic, so a step whose input,
    code version and config are unchanged reuses its stored output instead of computing it again.
    """
    spec = status.spec
    if not spec.steps:
        raise ReplayError(f"run {status.run_id} has no recorded spec (its start event was never seen)")
    if corrected is not None and corrected.steps:
        if [s.phase for s in corrected.steps] != [s.phase for s in spec.steps]:
            raise ReplayError(f"the corrected spec's phases {[s.phase for s in corrected.steps]} are not the run's "
                              f"{[s.phase for s in spec.steps]}")
        spec = pipeline_pb2.PipelineSpec(name=spec.name, steps=corrected.steps, inputs=spec.inputs)
    names = [(step.phase, _safe_phase_name(step.phase)) for step in spec.steps]
    step = next((i for i, pair in enumerate(names) if from_phase in pair), None)
    if step is None:
        known = ", ".join(name for _, name in names)
        raise ReplayError(f"run {status.run_id} has no phase {from_phase!r}; its phases: {known}")
    if step == 0:
        inputs = list(spec.inputs)
    else:
        stored = {done.step: done for done in status.completed_steps}
        if step - 1 not in stored:
            raise ReplayError(
                f"step {step - 1} ({spec.steps[step - 1].phase}) of run {status.run_id} has no stored output; "
                "replay from an earlier phase"
            )
        inputs = list(stored[step - 1].outputs)
    return pipeline_pb2.PipelineSpec(
        name=f"{spec.name or 'run'} (replay of {status.run_id} from {from_phase})",
        steps=spec.steps[step:],
        inputs=inputs,
    )


def _safe_phase_name(spec: str) -> str:
    try:
        return phase_name(spec)
    except (LookupError, TypeError):
        return spec


async def run_events(bus: Bus, topics: Topics, run_id: str, poll_s: float = 0.5) -> AsyncIterator[events_pb2.Envelope]:
    """The run's events on the runs topic from the first one on, then live (a throwaway group, no commits)."""
    consumer = bus.consumer([topics.runs], f"{topics.prefix}-watch-{uuid.uuid4().hex[:12]}")
    await consumer.start()
    try:
        while True:
            record = await consumer.next(poll_s)
            if record is None or record.key != run_id.encode():
                continue
            try:
                yield decode_envelope(record.value)
            except BadEvent as error:
                log.warning("watch of %s skips %s@%d: %s", run_id, record.topic, record.offset, error)
    finally:
        await consumer.stop()


class ControlServicer(control_pb2_grpc.ControlServiceServicer):
    def __init__(
        self,
        bus: Bus,
        view: StatusView,
        topics: Topics = Topics(),
        tracer_provider=None,
        prepare: Callable[[pipeline_pb2.PipelineSpec], Awaitable[None]] | None = None,
    ) -> None:
        self.bus, self.view, self.topics, self.tracer_provider = bus, view, topics, tracer_provider
        self.prepare = prepare  # embedded mode starts the spec's phase workers here
        # Runs started here; the view may not have folded their first event yet.
        self.started: set[str] = set()

    async def _start(self, spec: pipeline_pb2.PipelineSpec, run_id: str, context) -> str:
        if run_id in self.started or self.view.get(run_id) is not None:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"run {run_id!r} exists; start a new one")
        self.started.add(run_id)  # before any await, so a concurrent start of the same id is refused
        try:
            if self.prepare is not None:
                await self.prepare(spec)
            await start_pipeline(
                self.bus, spec, topics=self.topics, run_id=run_id, tracer_provider=self.tracer_provider
            )
        except (ValueError, LookupError, TypeError, BadEvent) as error:
            self.started.discard(run_id)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid pipeline spec: {error}")
        return run_id

    async def _known_run(self, run_id: str, context) -> control_pb2.RunStatus:
        if not run_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "run_id is required")
        wait_s = SEEN_TIMEOUT_S if run_id in self.started else 0.0
        status = await self.view.wait_for(run_id, timeout_s=wait_s)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no run {run_id!r}")
        return status

    async def StartPipeline(self, request: control_pb2.StartPipelineRequest, context):
        run_id = await self._start(request.spec, request.run_id or uuid.uuid4().hex, context)
        return control_pb2.StartPipelineResponse(run_id=run_id)

    async def GetRun(self, request: control_pb2.GetRunRequest, context):
        return await self._known_run(request.run_id, context)

    async def ListRuns(self, request: control_pb2.ListRunsRequest, context):
        if request.page_token and not request.page_token.isdigit():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad page token {request.page_token!r}")
        start, size = int(request.page_token or 0), request.page_size or DEFAULT_PAGE_SIZE
        runs = self.view.runs()
        token = str(start + size) if start + size < len(runs) else ""
        return control_pb2.ListRunsResponse(runs=runs[start : start + size], next_page_token=token)

    async def WatchRun(self, request: control_pb2.WatchRunRequest, context) -> AsyncIterator[events_pb2.Envelope]:
        await self._known_run(request.run_id, context)
        async for envelope in run_events(self.bus, self.topics, request.run_id):
            yield envelope
            if is_terminal(envelope, until_completed=request.until_completed):
                return

    async def Replay(self, request: control_pb2.ReplayRequest, context):
        status = await self._known_run(request.run_id, context)
        try:
            spec = replay_spec(status, request.from_phase, request.spec if request.HasField("spec") else None)
        except ReplayError as error:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        run_id = await self._start(spec, uuid.uuid4().hex, context)
        return control_pb2.StartPipelineResponse(run_id=run_id)


class EmbeddedWorkers:
    """Embedded mode's phase services: a PhaseWorker per phase on the in-process bus, started on first use."""

    def __init__(self, bus: Bus, store: ObjectStore, topics: Topics, tracer_provider=None) -> None:
        self.bus, self.store, self.topics, self.tracer_provider = bus, store, topics, tracer_provider
        self.stop = asyncio.Event()
        self.serving: dict[str, asyncio.Task] = {}

    async def ensure(self, spec: pipeline_pb2.PipelineSpec) -> None:
        for step in spec.steps:
            name = phase_name(step.phase)
            if name not in self.serving:
                worker = PhaseWorker(step.phase, self.bus, self.store, topics=self.topics,
                                     tracer_provider=self.tracer_provider)
                self.serving[name] = asyncio.create_task(worker.serve(self.stop, poll_s=0.05))

    async def close(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.serving.values(), return_exceptions=True)


async def start_control_server(servicer: ControlServicer, addr: str) -> tuple[grpc.aio.Server, int]:
    """Serve the control service on addr (host:port; port 0 picks a free one); returns the bound port."""
    server = grpc.aio.server()
    control_pb2_grpc.add_ControlServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(addr)
    if port == 0:
        raise OSError(f"cannot listen on {addr}")
    await server.start()
    return server, port


async def serve_control_async(settings: Settings, stop: asyncio.Event) -> None:
    """The control service with its status view and health endpoint, until `stop` is set.

    distributed: Kafka bus and the faust view. embedded: the in-process bus, the local store, phase
    workers in this process and the archived in-process view, so `agentforge start` works on a laptop.
    """
    topics = Topics.from_settings(settings)
    provider = make_tracer_provider("agentforge-control", settings)
    ready = asyncio.Event()
    health = await start_health_server(settings.health_addr, ready)
    workers = None
    if settings.mode == "distributed":
        bus = KafkaBus(settings.kafka_bootstrap, client_id="agentforge-control")
        await bus.start()
        view = FaustStatusView(settings, await runs_topic_partitions(settings))
    else:
        bus = InMemoryBus()
        view = MemoryStatusView(bus, topics, archive=RunArchive.from_settings(settings))
        workers = EmbeddedWorkers(bus, LocalStore(settings.local_store), topics, provider)
    await view.start()
    servicer = ControlServicer(bus, view, topics, provider, prepare=workers.ensure if workers else None)
    server, _ = await start_control_server(servicer, settings.grpc_addr)
    ready.set()
    log.info("control service (%s) on %s, health on %s", settings.mode, settings.grpc_addr, settings.health_addr)
    try:
        await stop.wait()
    finally:
        ready.clear()
        await server.stop(grace=5)
        if workers is not None:
            await workers.close()
        await view.stop()
        await bus.stop()
        await health.cleanup()
        provider.shutdown()


def serve_control(settings: Settings | None = None) -> None:
    """`agentforge control`: serve until SIGTERM or SIGINT."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve_control_async(settings or Settings(), stop)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(main())
