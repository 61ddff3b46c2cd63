"""The run-status view: every event on agentforge.runs folded into one RunStatus per run id.

One model (the RunStatus protobuf message), one fold, two feeds:
- distributed: a faust-streaming agent folds agentforge.runs into a Table keyed by run id
  (FaustStatusView); the table's changelog topic gets the source topic's partition count, or faust's
  co-partitioning breaks.
- embedded: the same fold over the in-process bus (MemoryStatusView), written through to a folder under
  Settings.local_store so `agentforge status` in another process sees embedded runs too.

The fold is order-independent: Kafka keeps one run's events in order within a partition, but a redelivery
after a crash re-sends old events and a replayed dead letter arrives late, so every field is a maximum
or a set keyed by step, and folding the same events in any order, any number of times, gives one status.
"""
from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_fixed

from shared.contracts.agentforge.v1 import control_pb2, events_pb2
from shared.fabric.bus import Bus
from shared.fabric.events import BadEvent, decode_envelope
from shared.fabric.topics import Topics
from shared.settings import Settings

log = logging.getLogger(__name__)

RunStatus = control_pb2.RunStatus
RunState = control_pb2.RunState
TERMINAL_STATES = (control_pb2.RUN_STATE_COMPLETED, control_pb2.RUN_STATE_FAILED)


def _later(a: Timestamp, b: Timestamp) -> Timestamp:
    return a if a.ToNanoseconds() >= b.ToNanoseconds() else b


def _advance(status: RunStatus, step: int, fraction: float, message: str) -> None:
    """Move the run's position forward to (step, fraction) unless it already stands further on."""
    here, there = (status.current_step, status.current_fraction), (step, fraction)
    if there > here or (there == here and message > status.message):  # ties: a fixed, order-free choice
        status.current_step, status.current_fraction, status.message = step, fraction, message


def _record_completed(status: RunStatus, done: events_pb2.PhaseCompleted) -> None:
    kept = {c.step: c for c in status.completed_steps}
    # A redelivery re-publishes the step with reused=True; the first, real run of the step is the record.
    if done.step not in kept or (kept[done.step].reused and not done.reused):
        kept[done.step] = done
    del status.completed_steps[:]
    status.completed_steps.extend(kept[step] for step in sorted(kept))


def fold(status: RunStatus | None, envelope: events_pb2.Envelope) -> RunStatus:
    """The run's status after `envelope`; pure (returns a new message)."""
    folded = RunStatus()
    if status is not None:
        folded.CopyFrom(status)
    folded.run_id = envelope.run_id
    folded.updated_at.CopyFrom(_later(folded.updated_at, envelope.created_at))
    kind = envelope.WhichOneof("payload")

    if kind == "pipeline_started":
        folded.spec.CopyFrom(envelope.pipeline_started.spec)
        folded.started_at.CopyFrom(envelope.created_at)
    elif kind == "phase_progress":
        p = envelope.phase_progress
        _advance(folded, p.step, p.fraction, p.message)
    elif kind == "phase_completed":
        done = envelope.phase_completed
        _record_completed(folded, done)
        _advance(folded, done.step, 1.0, f"{done.phase} done")
    elif kind == "phase_failed":
        failed = envelope.phase_failed
        # The step may have been redriven and completed already (its dead letter replayed after a fix).
        if not any(c.step >= failed.step for c in folded.completed_steps):
            folded.failure.CopyFrom(failed)
    elif kind == "pipeline_completed":
        del folded.outputs[:]
        folded.outputs.extend(envelope.pipeline_completed.outputs)
    # model_ready travels on the phase topics, not on agentforge.runs: nothing to fold.

    if folded.HasField("failure") and any(c.step >= folded.failure.step for c in folded.completed_steps):
        folded.ClearField("failure")  # the failed step completed after a redrive
    folded.state = _state(folded, kind)
    return folded


def _state(status: RunStatus, kind: str) -> int:
    # Completion is absorbing; a failure stands until the failed step completes. A redriven step that is
    # working again still reads FAILED until it completes: the fold keeps no clock to order a progress
    # event against the failure it follows (deliberate, so that the fold stays order-independent).
    if status.state == control_pb2.RUN_STATE_COMPLETED or kind == "pipeline_completed":
        return control_pb2.RUN_STATE_COMPLETED
    if status.HasField("failure"):
        return control_pb2.RUN_STATE_FAILED
    return control_pb2.RUN_STATE_RUNNING


def state_name(state: int) -> str:
    return control_pb2.RunState.Name(state).removeprefix("RUN_STATE_").lower()


def is_terminal(envelope: events_pb2.Envelope, *, until_completed: bool = False) -> bool:
    """Whether a watch ends at this event: at completion, or at a failure unless until_completed."""
    return envelope.WhichOneof("payload") in (("pipeline_completed",) if until_completed
                                              else ("pipeline_completed", "phase_failed"))


class StatusView(ABC):
    """Read side of the view, shared by the control service and `agentforge status`."""

    @abstractmethod
    def get(self, run_id: str) -> RunStatus | None: ...

    @abstractmethod
    def runs(self) -> list[RunStatus]:
        """Every known run, newest first."""

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def wait_for(self, run_id: str, timeout_s: float, poll_s: float = 0.1) -> RunStatus | None:
        """The run's status once the view has seen it, or None after timeout_s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (status := self.get(run_id)) is None and loop.time() < deadline:
            await asyncio.sleep(poll_s)
        return status


def newest_first(statuses) -> list[RunStatus]:
    return sorted(statuses, key=lambda s: (s.started_at.ToNanoseconds(), s.run_id), reverse=True)


class RunArchive:
    """Run statuses as files (<folder>/<run id>.binpb), so embedded runs outlive their process."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    @classmethod
    def from_settings(cls, settings: Settings) -> RunArchive:
        return cls(settings.local_store / "runs")

    def _path(self, run_id: str) -> Path:
        if not run_id or "/" in run_id or run_id.startswith("."):
            raise ValueError(f"{run_id!r} is not a run id")
        return self.folder / f"{run_id}.binpb"

    def save(self, status: RunStatus) -> None:
        path = self._path(status.run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(status.SerializeToString(deterministic=True))
        tmp.replace(path)  # readers never see half a status

    def load(self, run_id: str) -> RunStatus | None:
        path = self._path(run_id)
        return RunStatus.FromString(path.read_bytes()) if path.is_file() else None

    def save_traceparent(self, run_id: str, traceparent: str) -> None:
        path = self._path(run_id).with_suffix(".traceparent")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(traceparent)

    def load_traceparent(self, run_id: str) -> str:
        path = self._path(run_id).with_suffix(".traceparent")
        return path.read_text().strip() if path.is_file() else ""

    def all(self) -> list[RunStatus]:
        return [RunStatus.FromString(p.read_bytes()) for p in sorted(self.folder.glob("*.binpb"))]


class MemoryStatusView(StatusView):
    """The embedded feed: folds agentforge.runs from a Bus (the in-process one), optionally archived."""

    def __init__(self, bus: Bus, topics: Topics, archive: RunArchive | None = None, group: str = "") -> None:
        self.bus, self.topics, self.archive = bus, topics, archive
        self.group = group or f"{topics.prefix}-status"
        self.statuses: dict[str, RunStatus] = {}
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    def apply(self, envelope: events_pb2.Envelope) -> RunStatus:
        status = fold(self.statuses.get(envelope.run_id), envelope)
        self.statuses[envelope.run_id] = status
        if self.archive is not None:
            self.archive.save(status)
        return status

    def get(self, run_id: str) -> RunStatus | None:
        if run_id in self.statuses:
            return self.statuses[run_id]
        return self.archive.load(run_id) if self.archive is not None else None

    def runs(self) -> list[RunStatus]:
        known = {s.run_id: s for s in (self.archive.all() if self.archive is not None else [])}
        known.update(self.statuses)
        return newest_first(known.values())

    async def start(self) -> None:
        consumer = self.bus.consumer([self.topics.runs], self.group)
        await consumer.start()
        self._stop.clear()
        self._task = asyncio.create_task(consumer.run(self._handle, self._stop, poll_s=0.1))

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def _handle(self, record) -> None:
        try:
            self.apply(decode_envelope(record.value))
        except BadEvent as error:  # the view skips what it cannot read; the phases dead-letter it
            log.warning("status view skips %s[%d]@%d: %s", record.topic, record.partition, record.offset, error)


class FaustStatusView(StatusView):
    """The distributed feed: a faust agent folds agentforge.runs into a Table keyed by run id.

    faust's traps, and what this does about them: its web server binds 0.0.0.0:6066 by default, so it is
    off (the control service serves its own health endpoint); the table's changelog gets the partition
    count of agentforge.runs, read from the broker (co-partitioning); the fold is pure CPU and
    microseconds, so nothing blocks the loop that also drives the commit timer.
    """

    def __init__(self, settings: Settings, runs_partitions: int) -> None:
        import faust  # only the distributed feed needs it (it pulls in its own Kafka client)

        topics = Topics.from_settings(settings)
        # faust keeps table metadata in its datadir, by default "<app id>-data" in the working directory, and
        # creates only the last folder of it.
        datadir = settings.cache_dir / "faust" / f"{topics.prefix}-status"
        datadir.parent.mkdir(parents=True, exist_ok=True)
        self.app = faust.App(
            f"{topics.prefix}-status",
            broker=f"kafka://{settings.kafka_bootstrap}",
            store="memory://",  # rebuilt from the changelog on start; the view is small
            datadir=str(datadir),
            web_enabled=False,
            web_bind="127.0.0.1",
            web_host="127.0.0.1",
            autodiscover=False,
            topic_partitions=runs_partitions,
            consumer_auto_offset_reset="earliest",
            # Wake a stuck consumer within a minute rather than faust's silent five (faust's "Stream
            # stopped processing" trap); the fold is microseconds, so a minute without progress is a fault.
            stream_processing_timeout=60.0,
        )
        raw = faust.Schema(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
        self.source = self.app.topic(topics.runs, schema=raw, partitions=runs_partitions)
        # The table's serializers come from key_type/value_type (bytes -> "raw"), not from a schema: with a
        # schema the changelog is written raw but read back as JSON on recovery, which then stalls.
        self.table = self.app.Table("run-status", key_type=str, value_type=bytes, partitions=runs_partitions)
        self.agent = self.app.agent(self.source, name=f"{topics.prefix}-status-fold")(self._fold)

    async def _fold(self, stream):
        async for event in stream.events():
            try:
                envelope = decode_envelope(event.value)
            except BadEvent as error:
                log.warning("status view skips %s@%d: %s", event.message.topic, event.message.offset, error)
                yield None  # one result per event: faust's test context waits for it
                continue
            current = self.table.get(envelope.run_id)
            previous = RunStatus.FromString(current) if current is not None else None
            self.table[envelope.run_id] = fold(previous, envelope).SerializeToString(deterministic=True)
            yield envelope.run_id

    def get(self, run_id: str) -> RunStatus | None:
        stored = self.table.get(run_id)
        return RunStatus.FromString(stored) if stored is not None else None

    def runs(self) -> list[RunStatus]:
        return newest_first(RunStatus.FromString(v) for v in self.table.values())

    async def start(self, recovery_timeout_s: float = 300.0) -> None:
        """Start the agent and return once the table is rebuilt from its changelog (before that, reads
        would miss runs the view already knew)."""
        self.app.finalize()
        await self.app.start()
        await asyncio.wait_for(self.app.tables.recovery.completed.wait(), recovery_timeout_s)

    async def stop(self) -> None:
        await self.app.stop()


class TopicNotReady(RuntimeError):
    """The broker describes the topic without partitions (yet)."""


async def runs_topic_partitions(settings: Settings, wait_s: float = 10.0) -> int:
    """Partition count of agentforge.runs on the broker (created with the bus's default if missing). A topic
    just created can be described without partitions until its leader is elected, so this asks again for
    up to wait_s seconds."""
    from aiokafka.admin import AIOKafkaAdminClient

    from shared.fabric.kafka_bus import KafkaBus

    runs = Topics.from_settings(settings).runs
    await KafkaBus(settings.kafka_bootstrap).ensure_topics([runs])
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        async for attempt in AsyncRetrying(stop=stop_after_delay(wait_s), wait=wait_fixed(0.25),
                                           retry=retry_if_exception_type(TopicNotReady), reraise=True):
            with attempt:
                described = await admin.describe_topics([runs])
                partitions = next((t["partitions"] for t in described if t["topic"] == runs), [])
                if not partitions:
                    raise TopicNotReady(f"the broker at {settings.kafka_bootstrap} reports no partitions for {runs}")
    finally:
        await admin.close()
    return len(partitions)
