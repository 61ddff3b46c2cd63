"""Embedded mode: the whole pipeline in one process, with the local store and the in-process bus.

The same PhaseWorker code as the services runs here, one worker per phase on one event loop, so an
embedded run and a distributed run of the same spec and seeds give the same checkpoint digests.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from opentelemetry.trace import TracerProvider

from shared.contracts.agentforge.v1 import checkpoint_pb2, events_pb2, pipeline_pb2
from shared.fabric.events import Envelope, decode_envelope
from shared.fabric.local_store import LocalStore
from shared.fabric.memory_bus import InMemoryBus
from shared.fabric.phases import phase_name
from shared.fabric.pipeline import start_pipeline
from shared.fabric.storage import ObjectStore
from shared.fabric.topics import Topics
from shared.fabric.tracing import tracer_provider as make_tracer_provider
from shared.fabric.retry import RetryPolicy
from shared.fabric.worker import PhaseWorker
from shared.settings import Settings


class PipelineFailed(RuntimeError):
    def __init__(self, run_id: str, failure: events_pb2.PhaseFailed) -> None:
        super().__init__(f"run {run_id}: phase {failure.phase} failed ({failure.reason}): {failure.error}")
        self.run_id, self.failure = run_id, failure


@dataclass
class RunResult:
    run_id: str
    outputs: list[checkpoint_pb2.CheckpointRef]  # the last phase's checkpoints
    steps: list[events_pb2.PhaseCompleted]  # one per step, in order, with each phase's report
    events: list[Envelope] = field(default_factory=list)  # everything the run put on the runs topic


def run_embedded(
    spec: pipeline_pb2.PipelineSpec,
    *,
    settings: Settings | None = None,
    run_id: str | None = None,
    on_event: Callable[[Envelope], None] | None = None,
    store: ObjectStore | None = None,
    tracer_provider: TracerProvider | None = None,
    retry: RetryPolicy = RetryPolicy(),
) -> RunResult:
    """Run `spec` to completion in this process. Checkpoints go to Settings.local_store (or `store`);
    `on_event` sees every run event as it happens (progress bars). Raises PipelineFailed."""
    settings = settings or Settings()
    return asyncio.run(
        run_embedded_async(
            spec,
            store=store or LocalStore(settings.local_store),
            topics=Topics.from_settings(settings),
            run_id=run_id,
            on_event=on_event,
            tracer_provider=tracer_provider or make_tracer_provider("agentforge-embedded", settings),
            retry=retry,
        )
    )


async def run_embedded_async(
    spec: pipeline_pb2.PipelineSpec,
    *,
    store: ObjectStore,
    topics: Topics = Topics(),
    run_id: str | None = None,
    on_event: Callable[[Envelope], None] | None = None,
    tracer_provider: TracerProvider | None = None,
    retry: RetryPolicy = RetryPolicy(),
    bus: InMemoryBus | None = None,
) -> RunResult:
    bus = bus or InMemoryBus()  # pass one to inspect every topic afterwards (benchmarks, tests)
    workers = {}
    for step in spec.steps:
        name = phase_name(step.phase)
        if name not in workers:
            workers[name] = PhaseWorker(
                step.phase, bus, store, topics=topics, tracer_provider=tracer_provider, retry=retry
            )
    stop = asyncio.Event()
    serving = [asyncio.create_task(worker.serve(stop, poll_s=0.05)) for worker in workers.values()]
    runs = bus.consumer([topics.runs], f"{topics.prefix}-embedded-runner")
    await runs.start()
    try:
        run_id = await start_pipeline(
            bus, spec, topics=topics, run_id=run_id, source="agentforge-embedded", tracer_provider=tracer_provider
        )
        return await _follow(runs, run_id, serving, on_event)
    except BaseException:
        for task in serving:  # Ctrl-C or a failed run: abandon the phases in flight instead of finishing them
            task.cancel()
        raise
    finally:
        stop.set()
        for task in serving:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if tracer_provider is not None and hasattr(tracer_provider, "force_flush"):
            tracer_provider.force_flush()


async def _follow(runs, run_id: str, serving: list[asyncio.Task], on_event) -> RunResult:
    events, steps = [], []
    while True:
        for task in serving:
            if task.done():  # a worker died: its exception is the run's error
                task.result()
                raise RuntimeError("a phase worker stopped before the run completed")
        record = await runs.next(0.5)
        if record is None:
            continue
        await runs.commit(record)
        envelope = decode_envelope(record.value)
        if envelope.run_id != run_id:
            continue
        events.append(envelope)
        if on_event is not None:
            on_event(envelope)
        kind = envelope.WhichOneof("payload")
        if kind == "phase_completed":
            steps.append(envelope.phase_completed)
        elif kind == "phase_failed":
            raise PipelineFailed(run_id, envelope.phase_failed)
        elif kind == "pipeline_completed":
            return RunResult(run_id, list(envelope.pipeline_completed.outputs), steps, events)
