"""The phase runtime: consume a phase's ModelReady events, produce its outputs once, pass the run on.

For each event:
 1. decode and check it, the rest of its spec included (a bad event goes to the dead-letter topic at
    once: no retry can fix it); if the run's step was handed on before (a redelivery), stop there;
 2. derive the output key from (input digests, phase, code version, config hash); if the completion
    marker is there, the work was done before (redelivery, replay): skip to step 5;
 3. download and verify the inputs, run the pure transform in a thread (the event loop keeps the Kafka
    membership alive), emitting PhaseProgress;
 4. save, pack and upload each output, then write the completion marker;
 5. publish PhaseCompleted on the runs topic and the next step's ModelReady (or PipelineCompleted), then
    write the hand-off marker.
Each step retries under the RetryPolicy (shared/fabric/retry.py): an outage is waited out, a phase's error
gets a few attempts. When they run out, the event goes to the dead-letter topic and PhaseFailed to the
runs topic, and the handler returns normally, so the consumer commits and serves the next event: no
record can block its partition. Only an unreachable Kafka outlasting the window while dead-lettering
propagates; then nothing is committed and the event comes back after a restart.
From step 4 on (past bus.must_finish()) a rebalance waits for the handler instead of abandoning it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, TracerProvider
from pydantic import ValidationError

from shared.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from shared.contracts.agentforge.v1 import events_pb2
from shared.fabric.bus import Bus, Headers, Record, must_finish
from shared.fabric.dlq import send_to_dead_letters
from shared.fabric.events import BadEvent, Envelope, FailureReason, decode_envelope, new_envelope, step_config, step_gate
from shared.fabric.keys import completion_key, handoff_key, model_key, output_key
from shared.fabric.phases import load_phase, phase_name
from shared.fabric.pipeline import publish_envelope
from shared.fabric.retry import RetryPolicy, is_transient
from shared.fabric.storage import MissingObject, ObjectStore
from shared.fabric.topics import Topics
from shared.fabric.tracing import TRACER_NAME, extract_context, header_values, inject_context, set_attributes
from shared.fabric.transport import ChecksumMismatch, download_checkpoint, upload_checkpoint
from shared.phase import ForgedModel, PhaseCancelled, PhaseConfig, PhaseResult

log = logging.getLogger(__name__)
T = TypeVar("T")


class _GaveUp(Exception):
    def __init__(self, cause: Exception, attempts: int) -> None:
        super().__init__(str(cause))
        self.cause, self.attempts = cause, attempts


def failure_reason(error: Exception) -> FailureReason:
    if isinstance(error, BadEvent):
        return error.reason
    if isinstance(error, MissingObject):
        return FailureReason.MISSING_CHECKPOINT
    if is_transient(error):
        return FailureReason.INFRASTRUCTURE
    return FailureReason.PHASE_ERROR


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        self.remove_stale_work_dirs()
        await self.bus.ensure_topics([self.topics.phase_input(self.name), self.topics.runs, self.topics.dlq])
        consumer = self.bus.consumer([self.topics.phase_input(self.name)], self.topics.consumer_group(self.name))
        await consumer.start()
        self.serving.set()
        try:
            await consumer.run(self.handle, stop, poll_s)
        finally:
            self.serving.clear()
            await consumer.stop()

    @property
    def _work_prefix(self) -> str:
        return f"agentforge-{self.name}-"

    def remove_stale_work_dirs(self) -> None:
        """Delete the temporary folders of this phase's processes that died (SIGKILL, OOM) mid-event.
        A folder of our own pid is stale too: a restarted container keeps its pid (1) and its /tmp."""
        root = Path(self.work_dir or tempfile.gettempdir())
        for folder in root.glob(f"{self._work_prefix}*-*"):
            pid = folder.name[len(self._work_prefix):].partition("-")[0]
            if folder.is_dir() and pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
                log.info("removing %s, left by process %s", folder, pid)
                shutil.rmtree(folder, ignore_errors=True)

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
            handoff = handoff_key(envelope.run_id, ready.step)
            try:
                if await self._attempt("read the hand-off marker", lambda: asyncio.to_thread(self.store.get_bytes, handoff)):
                    log.info("%s run %s step %d was handed on before; nothing to do", self.name, envelope.run_id,
                             ready.step)
                    set_attributes(span, {"agentforge.duplicate": True})
                    return
                completed = await self._produce(envelope, ready)
                await must_finish()
                report = json.loads(completed.report_json or "{}")
                set_attributes(span, {
                    "agentforge.output_digests": [ref.digest for ref in completed.outputs],
                    "agentforge.reused": completed.reused,
                    **{f"agentforge.metric.{k}": v for k, v in report.items()},
                    **{f"agentforge.metric.{k}": v for k, v in report.get("summary", {}).items()},
                })
                await self._hand_on(envelope, ready, completed, handoff)
            except Exception as caught:  # whatever fails, the record ends in a dead letter, never a crash loop
                error, attempts = (caught.cause, caught.attempts) if isinstance(caught, _GaveUp) else (caught, 1)
                span.record_exception(error)
                span.set_status(Status(StatusCode.ERROR, str(error)))
                await self._give_up(record, envelope, error, attempts)

    async def _attempt(self, what: str, make: Callable[[], Awaitable[T]]) -> T:
        """make() under the retry policy; _GaveUp with the last error when the attempts run out."""
        attempts = 0
        try:
            async for attempt in self.retry.retrying(what):
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    return await make()
        except Exception as error:
            raise _GaveUp(error, attempts) from error
        raise AssertionError("unreachable: tenacity either returns or reraises")

    def _model_ready(self, envelope: Envelope) -> events_pb2.ModelReady:
        if envelope.WhichOneof("payload") != "model_ready":
            raise BadEvent(FailureReason.WRONG_EVENT, f"expected model_ready, got {envelope.WhichOneof('payload')}")
        ready = envelope.model_ready
        if ready.step >= len(ready.spec.steps):
            raise BadEvent(FailureReason.WRONG_EVENT, f"step {ready.step} is past the spec's {len(ready.spec.steps)} steps")
        step_phase = ready.spec.steps[ready.step].phase
        try:
            target = self.name if step_phase == self.phase_spec else phase_name(step_phase)
        except (LookupError, TypeError, ValueError) as error:
            raise BadEvent(FailureReason.WRONG_EVENT, str(error)) from error
        if target != self.name:
            raise BadEvent(FailureReason.WRONG_EVENT, f"step {ready.step} is for phase {target!r}, not {self.name!r}")
        # Checked before the work, so a spec whose next phase nobody serves fails now, not after the phase.
        for index in range(ready.step + 1, len(ready.spec.steps)):
            try:
                self.topics.phase_input(phase_name(ready.spec.steps[index].phase))
            except (LookupError, TypeError, ValueError) as error:
                raise BadEvent(FailureReason.INVALID_SPEC, f"step {index}: {error}") from error
        return ready

    def _config(self, ready: events_pb2.ModelReady) -> PhaseConfig:
        try:
            return self.phase.parse_config(step_config(ready.spec.steps[ready.step]))
        except ValidationError as error:
            raise BadEvent(FailureReason.INVALID_CONFIG, f"config for {self.name}: {error}") from error

    async def _produce(self, envelope: Envelope, ready: events_pb2.ModelReady) -> events_pb2.PhaseCompleted:
        config = self._config(ready)
        gate = step_gate(ready.spec.steps[ready.step])
        # A stored output passed the gate it was made under: another gate names another output.
        identity = config.config_hash() + (f"+gate:{gate.digest()}" if gate else "")
        key = output_key([ref.digest or ref.sha256 for ref in ready.inputs], self.name, self.phase.version, identity)
        marker = await self._attempt("read the completion marker",
                                     lambda: asyncio.to_thread(self.store.get_bytes, completion_key(key)))
        if marker is not None:
            await self._attempt("check the inputs", lambda: asyncio.to_thread(self._check_inputs, ready.inputs))
            completed = events_pb2.PhaseCompleted.FromString(marker)
            completed.reused = True
            log.info("%s run %s: output %s exists, reusing it", self.name, envelope.run_id, key)
            return completed
        await self._progress(envelope, ready, 0.0, "started")
        with tempfile.TemporaryDirectory(dir=self.work_dir, prefix=f"{self._work_prefix}{os.getpid()}-") as tmp:
            # Download and transform retry together: a phase may change its input models in place.
            result, parents = await self._attempt(
                f"{self.name} run {envelope.run_id}",
                lambda: self._load_and_transform(envelope, ready, config, gate, Path(tempfile.mkdtemp(dir=tmp))),
            )
            await must_finish()
            saved = await asyncio.to_thread(self._save_outputs, result, config, parents, Path(tmp) / "out")
            outputs = []
            for index, (name, folder) in enumerate(saved):
                key_of = partial(model_key, key, index, name)  # the archive's name carries its SHA-256
                outputs.append(await self._attempt(
                    f"upload {name}", lambda: asyncio.to_thread(upload_checkpoint, self.store, folder, key_of)))
        completed = events_pb2.PhaseCompleted(
            phase=self.name, outputs=outputs, report_json=json.dumps(result.report, sort_keys=True)
        )
        # Written last: its presence means every output above is whole. The first writer wins; a writer
        # that lost the race (another run of the same inputs and config) hands on the winner's outputs.
        payload = completed.SerializeToString()
        if await self._attempt("write the completion marker",
                               lambda: asyncio.to_thread(self.store.put_bytes_if_absent, completion_key(key), payload)):
            return completed
        log.info("%s run %s: output %s was completed by another writer first; handing on its outputs", self.name,
                 envelope.run_id, key)
        winner = await self._attempt("read the completion marker",
                                     lambda: asyncio.to_thread(self.store.get_bytes, completion_key(key)))
        adopted = events_pb2.PhaseCompleted.FromString(winner)
        adopted.reused = True
        kept = {ref.uri for ref in adopted.outputs}  # identical bytes get the identical name: keep those
        for index, ((name, _), ref) in enumerate(zip(saved, outputs, strict=True)):
            if ref.uri not in kept:
                await self._attempt("delete a duplicate output", lambda: asyncio.to_thread(
                    self.store.delete, model_key(key, index, name, ref.sha256)))
        return adopted

    async def _load_and_transform(
        self, envelope: Envelope, ready: events_pb2.ModelReady, config: PhaseConfig, gate, directory: Path
    ) -> tuple[PhaseResult, list[str]]:
        models, parents = await asyncio.to_thread(self._load_inputs, ready.inputs, directory)
        # A thread cannot be cancelled; when this coroutine is, the phase stops at its next progress report.
        cancelled = threading.Event()
        progress = self._progress_callback(envelope, ready, cancelled)
        try:
            if gate is not None:  # the inputs are measured first: a phase may change them in place
                before = await asyncio.to_thread(self._gate_inputs, gate, models, progress)
            result = await asyncio.to_thread(self.phase.transform, models, config, progress)
            if gate is not None:
                await asyncio.to_thread(self._gate_outputs, gate, before, result, progress)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return result, parents

    @staticmethod
    def _gate_inputs(gate, models: list[ForgedModel], progress) -> dict[str, float]:
        from shared.gate import GateError, input_values

        try:
            return input_values(gate, models, lambda f, m: progress(0.0, f"gate, the inputs: {m}"))
        except GateError as error:
            raise BadEvent(FailureReason.INVALID_SPEC, f"gate: {error}") from error

    @staticmethod
    def _gate_outputs(gate, before: dict[str, float], result: PhaseResult, progress) -> None:
        """The verdict goes into the report; a failed one stops the step before anything is stored."""
        from shared.gate import GateError, verdict

        try:
            result.report["gate"] = verdict(gate, before, result.models, lambda f, m: progress(1.0, f"gate: {m}"))
        except GateError as error:
            raise BadEvent(FailureReason.INVALID_SPEC, f"gate: {error}") from error
        if not result.report["gate"]["passed"]:
            raise BadEvent(FailureReason.GATE_FAILED, result.report["gate"]["reason"])

    def _check_inputs(self, refs) -> None:
        """Before reusing an output: the event's inputs are stored with the SHA-256 it states (the output is
        keyed on their content, so an event naming a missing or corrupt object must not pass for them)."""
        for ref in refs:
            stored = self.store.stat_uri(ref.uri, ref.version_id)
            if stored is None:
                raise MissingObject(f"no object at {ref.uri} (version {ref.version_id or 'latest'})")
            if stored.sha256 != ref.sha256:
                raise BadEvent(FailureReason.SHA256_MISMATCH,
                               f"{ref.uri}: stored SHA-256 {stored.sha256} but the event says {ref.sha256}")

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
        self, result: PhaseResult, config: PhaseConfig, parents: list[str], directory: Path
    ) -> list[tuple[str, Path]]:
        """Each output model as a checkpoint folder: (model name, folder)."""
        if not result.models:
            raise ValueError(f"phase {self.name} returned no models")
        saved = []
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
            saved.append((forged.name, target))
        return saved

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

    async def _hand_on(
        self, envelope: Envelope, ready: events_pb2.ModelReady, completed: events_pb2.PhaseCompleted, handoff: str
    ) -> None:
        """Publish the step's completion and the run's next event, each retried on its own (a retry of
        the pair would repeat the first), then mark the step handed on."""
        completed.step = ready.step
        run_id = envelope.run_id
        await self._attempt("publish PhaseCompleted",
                            lambda: self._publish(self.topics.runs, run_id, phase_completed=completed))
        next_step = ready.step + 1
        if next_step < len(ready.spec.steps):
            following = events_pb2.ModelReady(spec=ready.spec, step=next_step, inputs=completed.outputs)
            topic = self.topics.phase_input(phase_name(ready.spec.steps[next_step].phase))

            async def publish_next() -> None:
                await self.bus.ensure_topics([topic])  # created with our partitions, never by the broker
                await self._publish(topic, run_id, model_ready=following)

            await self._attempt("publish the next ModelReady", publish_next)
        else:
            done = events_pb2.PipelineCompleted(outputs=completed.outputs)
            await self._attempt("publish PipelineCompleted",
                                lambda: self._publish(self.topics.runs, run_id, pipeline_completed=done))
        payload = completed.SerializeToString()
        await self._attempt("write the hand-off marker", lambda: asyncio.to_thread(self.store.put_bytes, handoff, payload))

    async def _give_up(self, record: Record, envelope: Envelope | None, error: Exception, attempts: int) -> None:
        await must_finish()
        reason = failure_reason(error)
        log.error("%s gives up on %s[%d]@%d (%s): %s", self.name, record.topic, record.partition, record.offset,
                  reason, error)
        # If Kafka itself stays down this raises: nothing is committed and the record comes back later.
        await self._attempt("dead-letter", lambda: send_to_dead_letters(
            self.bus, self.topics, record, reason=reason, error=str(error), attempts=attempts, phase=self.name))
        # An event that does not decode still names its run in the record key (events are keyed by run id).
        run_id = envelope.run_id if envelope is not None else (record.key or b"").decode("utf-8", "replace")
        if run_id:
            ready = envelope is not None and envelope.WhichOneof("payload") == "model_ready"
            failed = events_pb2.PhaseFailed(step=envelope.model_ready.step if ready else 0, phase=self.name,
                                            reason=reason, error=str(error), attempts=attempts)
            await self._attempt("publish PhaseFailed", lambda: self._publish(self.topics.runs, run_id, phase_failed=failed))
