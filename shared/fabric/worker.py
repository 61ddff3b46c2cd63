"""The phase runtime: consume a phase's ModelReady events, produce its outputs once, pass the run on.

For each event:
 1. decode and check it (a bad event goes to the dead-letter topic at once, no retry can fix it);
 2. derive the output key from (input SHA-256s, phase, code version, config hash); if the completion
    marker is there, the work was done before (redelivery, replay): skip to step 5;
 3. download and verify the inputs, run the pure transform in a thread (the event loop keeps the Kafka
    membership alive), emitting PhaseProgress;
 4. save, pack and upload each output, then write the completion marker;
 5. publish PhaseCompleted on the runs topic and the next step's ModelReady (or PipelineCompleted).
Steps 2-4 retry with exponential back-off; when retries run out the event goes to the dead-letter
topic and PhaseFailed to the runs topic. The handler returns normally in both cases, so the consumer
commits and serves the next event. Only a failure to publish propagates: then nothing is committed and
the event comes back after a restart.
"""
from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, TracerProvider
from pydantic import ValidationError
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from shared.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from shared.contracts.agentforge.v1 import checkpoint_pb2, events_pb2
from shared.fabric.bus import Bus, Headers, Record
from shared.fabric.dlq import send_to_dead_letters
from shared.fabric.events import BadEvent, Envelope, FailureReason, decode_envelope, new_envelope, step_config
from shared.fabric.keys import completion_key, model_key, output_key
from shared.fabric.phases import load_phase, phase_name
from shared.fabric.pipeline import publish_envelope
from shared.fabric.storage import MissingObject, ObjectStore
from shared.fabric.topics import Topics
from shared.fabric.tracing import TRACER_NAME, extract_context, header_values, inject_context, set_attributes
from shared.fabric.transport import ChecksumMismatch, download_checkpoint, upload_checkpoint
from shared.phase import ForgedModel, PhaseCancelled, PhaseConfig, PhaseResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3
    initial_s: float = 1.0
    max_s: float = 30.0


def _retriable(error: BaseException) -> bool:
    return isinstance(error, Exception) and not isinstance(error, BadEvent)


class _GaveUp(Exception):
    def __init__(self, cause: Exception, attempts: int) -> None:
        super().__init__(str(cause))
        self.cause, self.attempts = cause, attempts


def failure_reason(error: Exception) -> FailureReason:
    if isinstance(error, BadEvent):
        return error.reason
    if isinstance(error, MissingObject):
        return FailureReason.MISSING_CHECKPOINT
    return FailureReason.PHASE_ERROR


class PhaseWorker:
    def __init__(
        self,
        phase_spec: str,
        bus: Bus,
        store: ObjectStore,
        *,
        topics: Topics = Topics(),
        tracer_provider: TracerProvider | None = None,
        retry: RetryPolicy = RetryPolicy(),
        work_dir: Path | None = None,
        progress_interval_s: float = 1.0,
    ) -> None:
        self.phase_spec, self.phase = phase_spec, load_phase(phase_spec)
        self.name = self.phase.name
        self.source = f"agentforge-{self.name}"
        self.bus, self.store, self.topics, self.retry = bus, store, topics, retry
        self.tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer(TRACER_NAME)
        self.work_dir, self.progress_interval_s = work_dir, progress_interval_s
        self.serving = asyncio.Event()  # set once consuming: the readiness probe

    async def serve(self, stop: asyncio.Event, poll_s: float = 0.5) -> None:
        """Consume this phase's topic until `stop` is set (noticed within poll_s); the event in hand finishes."""
        await self.bus.ensure_topics([self.topics.phase_input(self.name), self.topics.runs, self.topics.dlq])
        consumer = self.bus.consumer([self.topics.phase_input(self.name)], self.topics.consumer_group(self.name))
        await consumer.start()
        self.serving.set()
        try:
            await consumer.run(self.handle, stop, poll_s)
        finally:
            self.serving.clear()
            await consumer.stop()

    async def handle(self, record: Record) -> None:
        envelope = None
        try:
            envelope = decode_envelope(record.value)
            ready = self._model_ready(envelope)
        except BadEvent as error:
            await self._give_up(record, envelope, error, attempts=1)
            return
        parent = extract_context(record.headers, fallback={"traceparent": envelope.trace.traceparent,
                                                           "tracestate": envelope.trace.tracestate})
        with self.tracer.start_as_current_span(f"{self.name}", context=parent, kind=SpanKind.CONSUMER) as span:
            set_attributes(span, {
                "agentforge.run_id": envelope.run_id,
                "agentforge.phase": self.name,
                "agentforge.step": ready.step,
                "agentforge.event_id": envelope.event_id,
                "agentforge.input_digests": [ref.digest for ref in ready.inputs],
                "messaging.system": "kafka",
                "messaging.destination.name": record.topic,
                "messaging.kafka.message.offset": record.offset,
            })
            try:
                completed = await self._produce_with_retries(envelope, ready)
            except _GaveUp as gave_up:
                span.record_exception(gave_up.cause)
                span.set_status(Status(StatusCode.ERROR, str(gave_up.cause)))
                await self._give_up(record, envelope, gave_up.cause, gave_up.attempts)
                return
            report = json.loads(completed.report_json or "{}")
            set_attributes(span, {
                "agentforge.output_digests": [ref.digest for ref in completed.outputs],
                "agentforge.reused": completed.reused,
                **{f"agentforge.metric.{k}": v for k, v in report.items()},
                **{f"agentforge.metric.{k}": v for k, v in report.get("summary", {}).items()},
            })
            await self._publish_next(envelope, ready, completed)

    def _model_ready(self, envelope: Envelope) -> events_pb2.ModelReady:
        if envelope.WhichOneof("payload") != "model_ready":
            raise BadEvent(FailureReason.WRONG_EVENT, f"expected model_ready, got {envelope.WhichOneof('payload')}")
        ready = envelope.model_ready
        if ready.step >= len(ready.spec.steps):
            raise BadEvent(FailureReason.WRONG_EVENT, f"step {ready.step} is past the spec's {len(ready.spec.steps)} steps")
        step_phase = ready.spec.steps[ready.step].phase
        try:
            target = self.name if step_phase == self.phase_spec else phase_name(step_phase)
        except (LookupError, TypeError) as error:
            raise BadEvent(FailureReason.WRONG_EVENT, str(error)) from error
        if target != self.name:
            raise BadEvent(FailureReason.WRONG_EVENT, f"step {ready.step} is for phase {target!r}, not {self.name!r}")
        return ready

    def _config(self, ready: events_pb2.ModelReady) -> PhaseConfig:
        try:
            return self.phase.parse_config(step_config(ready.spec.steps[ready.step]))
        except ValidationError as error:
            raise BadEvent(FailureReason.INVALID_CONFIG, f"config for {self.name}: {error}") from error

    async def _produce_with_retries(self, envelope: Envelope, ready: events_pb2.ModelReady) -> events_pb2.PhaseCompleted:
        attempts = 0
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.retry.attempts),
            wait=wait_exponential(multiplier=self.retry.initial_s, max=self.retry.max_s),
            retry=retry_if_exception(_retriable),
            before_sleep=lambda state: log.warning(
                "%s run %s: attempt %d failed, retrying: %r", self.name, envelope.run_id, state.attempt_number,
                state.outcome.exception(), exc_info=state.outcome.exception()),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    return await self._produce(envelope, ready)
        except Exception as error:
            raise _GaveUp(error, attempts) from error
        raise AssertionError("unreachable: tenacity either returns or reraises")

    async def _produce(self, envelope: Envelope, ready: events_pb2.ModelReady) -> events_pb2.PhaseCompleted:
        config = self._config(ready)
        key = output_key([ref.sha256 for ref in ready.inputs], self.name, self.phase.version, config.config_hash())
        marker = await asyncio.to_thread(self.store.get_bytes, completion_key(key))
        if marker is not None:
            completed = events_pb2.PhaseCompleted.FromString(marker)
            completed.reused = True
            log.info("%s run %s: output %s exists, reusing it", self.name, envelope.run_id, key)
            return completed
        await self._progress(envelope, ready, 0.0, "started")
        with tempfile.TemporaryDirectory(dir=self.work_dir, prefix=f"agentforge-{self.name}-") as tmp:
            models, parents = await asyncio.to_thread(self._load_inputs, ready.inputs, Path(tmp) / "in")
            # A thread cannot be cancelled; when this coroutine is, the phase stops at its next progress report.
            cancelled = threading.Event()
            progress = self._progress_callback(envelope, ready, cancelled)
            try:
                result = await asyncio.to_thread(self.phase.transform, models, config, progress)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            outputs = await asyncio.to_thread(self._save_outputs, result, config, parents, key, Path(tmp) / "out")
        completed = events_pb2.PhaseCompleted(
            phase=self.name, outputs=outputs, report_json=json.dumps(result.report, sort_keys=True)
        )
        # Written last: its presence means every output above is whole.
        await asyncio.to_thread(self.store.put_bytes, completion_key(key), completed.SerializeToString())
        return completed

    def _load_inputs(self, refs, directory: Path) -> tuple[list[ForgedModel], list[str]]:
        models, parents = [], []
        for index, ref in enumerate(refs):
            target = directory / f"{index:02d}"
            try:
                download_checkpoint(self.store, ref, target)
                forged, manifest = load_checkpoint(target)
            except ChecksumMismatch as error:
                raise BadEvent(FailureReason.SHA256_MISMATCH, str(error)) from error
            except CheckpointError as error:
                raise BadEvent(FailureReason.INVALID_CHECKPOINT, f"{ref.uri}: {error}") from error
            models.append(forged)
            parents.append(manifest.digest)
        return models, parents

    def _save_outputs(
        self, result: PhaseResult, config: PhaseConfig, parents: list[str], key: str, directory: Path
    ) -> list[checkpoint_pb2.CheckpointRef]:
        if not result.models:
            raise ValueError(f"phase {self.name} returned no models")
        refs = []
        for index, forged in enumerate(result.models):
            target = directory / f"{index:02d}"
            save_checkpoint(
                forged,
                target,
                phase=self.name,
                code_version=self.phase.version,
                config=config.model_dump(mode="json"),
                config_hash=config.config_hash(),
                parents=parents,
                metrics=result.report,
                extra_files=result.extra_files.get(forged.name),
            )
            refs.append(upload_checkpoint(self.store, target, model_key(key, index, forged.name)))
        return refs

    def _progress_callback(self, envelope: Envelope, ready: events_pb2.ModelReady, cancelled: threading.Event):
        """progress(fraction, message) for the phase's thread: hands throttled events to the loop, and
        raises PhaseCancelled once `cancelled` is set."""
        loop = asyncio.get_running_loop()
        last = [0.0]

        def progress(fraction: float, message: str) -> None:
            if cancelled.is_set():
                raise PhaseCancelled(f"{self.name} run {envelope.run_id} was abandoned")
            now = time.monotonic()
            if now - last[0] < self.progress_interval_s and fraction < 1.0:
                return
            last[0] = now
            asyncio.run_coroutine_threadsafe(self._progress(envelope, ready, fraction, message), loop)

        return progress

    async def _progress(self, envelope: Envelope, ready: events_pb2.ModelReady, fraction: float, message: str) -> None:
        # Progress is telemetry: losing one must not fail the phase.
        try:
            update = events_pb2.PhaseProgress(step=ready.step, phase=self.name, fraction=fraction, message=message)
            await self._publish(self.topics.runs, envelope.run_id, phase_progress=update)
        except Exception:
            log.exception("could not publish progress for run %s", envelope.run_id)

    async def _publish(self, topic: str, run_id: str, **payload) -> None:
        trace_headers: Headers = []
        inject_context(trace_headers)
        event = new_envelope(run_id, self.source, **header_values(trace_headers), **payload)
        await publish_envelope(self.bus, topic, event, trace_headers)

    async def _publish_next(
        self, envelope: Envelope, ready: events_pb2.ModelReady, completed: events_pb2.PhaseCompleted
    ) -> None:
        completed.step = ready.step
        await self._publish(self.topics.runs, envelope.run_id, phase_completed=completed)
        next_step = ready.step + 1
        if next_step < len(ready.spec.steps):
            following = events_pb2.ModelReady(spec=ready.spec, step=next_step, inputs=completed.outputs)
            topic = self.topics.phase_input(phase_name(ready.spec.steps[next_step].phase))
            await self._publish(topic, envelope.run_id, model_ready=following)
        else:
            done = events_pb2.PipelineCompleted(outputs=completed.outputs)
            await self._publish(self.topics.runs, envelope.run_id, pipeline_completed=done)

    async def _give_up(self, record: Record, envelope: Envelope | None, error: Exception, attempts: int) -> None:
        reason = failure_reason(error)
        log.error("%s gives up on %s[%d]@%d (%s): %s", self.name, record.topic, record.partition, record.offset,
                  reason, error)
        await send_to_dead_letters(
            self.bus, self.topics, record, reason=reason, error=str(error), attempts=attempts, phase=self.name
        )
        if envelope is not None:
            step = envelope.model_ready.step if envelope.WhichOneof("payload") == "model_ready" else 0
            failed = events_pb2.PhaseFailed(
                step=step, phase=self.name, reason=reason, error=str(error), attempts=attempts
            )
            await self._publish(self.topics.runs, envelope.run_id, phase_failed=failed)
