"""The run commands of `agentforge`: run, start, status, watch, replay, trace, serve, control, dlq.

`run` is the whole pipeline in this process (embedded mode, `make run`). The others talk to the control
service when one answers on Settings.grpc_addr; without one, `start` publishes straight to Kafka
(distributed mode) and `status`, `watch` and `replay` read the runs this machine archived (embedded).
"""
from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import grpc
import httpx
import typer
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from shared.contracts.agentforge.v1 import control_pb2, control_pb2_grpc, events_pb2, pipeline_pb2
from shared.fabric.events import pipeline_spec
from shared.fabric.phases import load_phase
from shared.fabric.status_view import RunArchive, RunStatus, fold, newest_first, state_name
from shared.fabric.topics import Topics
from shared.phase import available_phases
from shared.settings import Settings

console = Console()

# The eight phases in pipeline order. A registered phase missing here runs after these, by name.
PIPELINE_ORDER = ("cognate", "evomerge", "quietstar", "bitnet", "forge", "baking", "adas", "compression")
CONTROL_TIMEOUT_S = 2.0


# --- specs --------------------------------------------------------------------------------------------


class StepFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    phase: str
    config: dict[str, Any] = Field(default_factory=dict)
    # A quality gate (shared.gate.Gate): {metric, max_drop and/or floor, scorecard}; validated with the spec.
    gate: dict[str, Any] | None = None


class SpecFile(BaseModel):
    """A pipeline spec as YAML: `name:` and `steps:` of `{phase: NAME, config: {...}}`."""

    model_config = ConfigDict(extra="forbid")
    name: str = ""
    steps: list[StepFile]


def default_spec_file() -> SpecFile:
    """Every registered phase in pipeline order, each on its default config."""
    registered = available_phases()
    if not registered:
        raise typer.BadParameter("no phases are registered (is the project installed? `make venv`)")
    order = {name: index for index, name in enumerate(PIPELINE_ORDER)}
    names = sorted(registered, key=lambda name: (order.get(name, len(order)), name))
    return SpecFile(name="default", steps=[StepFile(phase=name) for name in names])


def default_spec() -> pipeline_pb2.PipelineSpec:
    """The default spec, each step's default config written out."""
    return checked_spec(default_spec_file())


def checked_spec(spec: SpecFile) -> pipeline_pb2.PipelineSpec:
    """The protobuf spec, after every step's phase is found and its config validates."""
    if not spec.steps:
        raise typer.BadParameter("the spec has no steps")
    from shared.gate import Gate

    steps, gates = [], {}
    for index, step in enumerate(spec.steps):
        try:
            phase = load_phase(step.phase)
            config = phase.parse_config(step.config)
        except (LookupError, TypeError) as error:
            raise typer.BadParameter(f"step {index}: {error}") from error
        except ValidationError as error:
            raise typer.BadParameter(f"step {index} ({step.phase}): invalid config:\n{error}") from error
        if step.gate is not None:
            if index == 0 and step.gate.get("max_drop") is not None:
                raise typer.BadParameter(f"step 0 ({step.phase}) has no input to drop against: give its gate a floor")
            try:
                gates[index] = Gate.model_validate(step.gate).model_dump(mode="json")
            except ValidationError as error:
                raise typer.BadParameter(f"step {index} ({step.phase}): invalid gate:\n{error}") from error
        steps.append((step.phase, config.model_dump(mode="json")))
    return pipeline_spec(steps, name=spec.name, gates=gates)


PRESETS_DIR = Path(__file__).parent / "presets"
DEFAULT_PRESET = "tiny"  # `make run`'s: the eight phases sized to run in 20 minutes on 2 cores
FULL_PRESET = "full"  # every phase on its own defaults (what each phase's benchmark measured)


def pipeline_presets() -> list[str]:
    """`full` is the default spec (every phase on its defaults, the `tiny` model); the others are YAML specs here."""
    return [FULL_PRESET, *sorted(path.stem for path in PRESETS_DIR.glob("*.yaml"))]


def spec_file(path: Path | None, preset: str = DEFAULT_PRESET) -> SpecFile:
    """The spec a --spec file or a --preset names, as written (its configs not yet validated)."""
    if path is not None and preset != DEFAULT_PRESET:
        raise typer.BadParameter("give --spec or --preset, not both")
    if preset not in pipeline_presets():
        raise typer.BadParameter(f"unknown preset {preset!r}; known: {', '.join(pipeline_presets())}")
    if path is None and preset == FULL_PRESET:
        return default_spec_file()
    path = path or PRESETS_DIR / f"{preset}.yaml"
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise typer.BadParameter(f"cannot read spec {path}: {error}") from error
    try:
        return SpecFile.model_validate(raw)
    except ValidationError as error:
        raise typer.BadParameter(f"{path} is not a pipeline spec:\n{error}") from error


def load_spec(path: Path | None, preset: str = DEFAULT_PRESET) -> pipeline_pb2.PipelineSpec:
    return checked_spec(spec_file(path, preset))


# --- the control service, or the local archive ---------------------------------------------------------


def control_stub(settings: Settings) -> control_pb2_grpc.ControlServiceStub | None:
    """A stub for the control service if one answers on Settings.grpc_addr, else None."""
    channel = grpc.insecure_channel(settings.grpc_addr)
    try:
        grpc.channel_ready_future(channel).result(timeout=CONTROL_TIMEOUT_S)
    except grpc.FutureTimeoutError:
        channel.close()
        return None
    return control_pb2_grpc.ControlServiceStub(channel)


def fail(message: str) -> typer.Exit:
    console.print(f"[red]{message}[/red]")
    return typer.Exit(1)


def call(rpc: Callable, request) -> Any:
    try:
        return rpc(request)
    except grpc.RpcError as error:
        raise fail(f"control service: {error.code().name}: {error.details()}") from error


def no_control_in_distributed(settings: Settings) -> typer.Exit:
    return fail(f"no control service answers on {settings.grpc_addr}; start one with `agentforge control`")


def archived_run(settings: Settings, run_id: str) -> RunStatus:
    status = RunArchive.from_settings(settings).load(run_id)
    if status is None:
        raise fail(f"no run {run_id!r} in {RunArchive.from_settings(settings).folder} and no control service "
                   f"on {settings.grpc_addr}")
    return status


def find_run(settings: Settings, run_id: str) -> RunStatus:
    """A run's status from the control service if one answers, else from this machine's archive."""
    stub = control_stub(settings)
    if stub is None and settings.mode == "distributed":
        raise no_control_in_distributed(settings)
    return call(stub.GetRun, control_pb2.GetRunRequest(run_id=run_id)) if stub else archived_run(settings, run_id)


# --- rendering -----------------------------------------------------------------------------------------


def step_state(status: RunStatus, step: int) -> str:
    done = {c.step: c for c in status.completed_steps}
    if step in done:
        return "reused" if done[step].reused else "done"
    if status.HasField("failure") and status.failure.step == step:
        return "failed"
    if status.state == control_pb2.RUN_STATE_RUNNING and step == status.current_step:
        return "running"
    return "pending"


def runs_table(runs: list[RunStatus]) -> Table:
    # Ids stay whole, to copy into the next command.
    table = Table(Column("run", no_wrap=True), "name", Column("state", no_wrap=True), "step", "progress",
                  "started (UTC)", "updated (UTC)")
    for s in runs:
        phases = [step.phase for step in s.spec.steps]
        where = f"{s.current_step + 1}/{len(phases)} {phases[s.current_step]}" if s.current_step < len(phases) else "-"
        table.add_row(s.run_id, s.spec.name, state_name(s.state), where, f"{s.current_fraction:.0%}",
                      _when(s.started_at), _when(s.updated_at))
    return table


def _when(timestamp) -> str:
    return timestamp.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if timestamp.ToNanoseconds() else "-"


def report_summary(report_json: str) -> str:
    """A phase report's headline numbers ("summary"), or its top-level scalars; the whole report is in
    each output checkpoint's manifest.json."""
    if not report_json:
        return ""
    report = json.loads(report_json)
    headline = report.get("summary") or {k: v for k, v in report.items() if isinstance(v, (str, int, float, bool))}
    return "\n".join(f"{key}: {value}" for key, value in headline.items())


def show_run(status: RunStatus) -> None:
    console.print(f"[bold]run {status.run_id}[/bold] {status.spec.name}: {state_name(status.state)}")
    table = Table("step", "phase", "state", "report")
    reports = {c.step: c.report_json for c in status.completed_steps}
    for index, step in enumerate(status.spec.steps):
        state = step_state(status, index)
        if state == "running":
            state = f"running {status.current_fraction:.0%}: {status.message}"
        table.add_row(str(index), step.phase, state, report_summary(reports.get(index, "")))
    console.print(table)
    if status.HasField("failure"):
        f = status.failure
        console.print(f"[red]failed at step {f.step} ({f.phase}) after {f.attempts} attempt(s): "
                      f"{f.reason}: {f.error}[/red]")
    for output in status.outputs:
        console.print(f"output {output.name}: {output.uri} sha256 {output.sha256}")


class RunProgress:
    """Progress of one run, driven by its successive statuses: rich bars, one per step, in a terminal; plain
    lines (a step's start and end, and each tenth of it) when the output is a log, CI or a pipe."""

    def __init__(self) -> None:
        self.bars = console.is_terminal
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[message]}"), console=console)
        self.tasks: dict[int, Any] = {}
        self.printed: dict[int, str | int] = {}  # plain lines: per step, the last tenth (or state) shown

    def __enter__(self) -> RunProgress:
        if self.bars:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bars:
            self.progress.stop()

    def update(self, status: RunStatus) -> None:
        for index, step in enumerate(status.spec.steps):
            state = step_state(status, index)
            if self.bars:
                self._bar(index, f"{index + 1}. {step.phase}", state, status)
            else:
                self._line(index, f"{index + 1}/{len(status.spec.steps)} {step.phase}", state, status)

    def _bar(self, index: int, label: str, state: str, status: RunStatus) -> None:
        if index not in self.tasks:
            self.tasks[index] = self.progress.add_task(label, total=1.0, message="")
        if state in ("done", "reused"):
            self.progress.update(self.tasks[index], completed=1.0, message=state)
        elif state == "running":
            self.progress.update(self.tasks[index], completed=status.current_fraction, message=status.message)
        elif state == "failed":
            self.progress.update(self.tasks[index], message=f"[red]failed: {status.failure.reason}[/red]")

    def _line(self, index: int, label: str, state: str, status: RunStatus) -> None:
        shown = self.printed.get(index)
        if state == "running":
            tenth = int(status.current_fraction * 10)
            if shown is None or (isinstance(shown, int) and tenth > shown):
                self.printed[index] = tenth
                console.print(f"{label} [{status.current_fraction:4.0%}] {status.message}", highlight=False)
        elif state in ("done", "reused", "failed") and shown != state:
            self.printed[index] = state
            detail = f": {status.failure.reason}" if state == "failed" else ""
            console.print(f"{label} {state}{detail}", highlight=False)


def watch_statuses(settings: Settings, run_id: str, until_completed: bool = False) -> Iterator[RunStatus]:
    """Successive statuses of a run until it completes or fails (or, until_completed, until it completes):
    folded from the control service's event stream, else polled from the archive an embedded run in
    another process writes."""
    stub = control_stub(settings)
    if stub is not None:
        status = None
        request = control_pb2.WatchRunRequest(run_id=run_id, until_completed=until_completed)
        try:
            for envelope in stub.WatchRun(request):
                status = fold(status, envelope)
                yield status
        except grpc.RpcError as error:
            raise fail(f"control service: {error.code().name}: {error.details()}") from error
        return
    if settings.mode == "distributed":
        raise no_control_in_distributed(settings)
    seen = None
    while True:
        status = archived_run(settings, run_id)
        if status != seen:
            yield status
            seen = status
        if status.state in (control_pb2.RUN_STATE_COMPLETED, control_pb2.RUN_STATE_FAILED):
            return
        time.sleep(0.5)


def follow(statuses) -> RunStatus | None:
    last = None
    with RunProgress() as bars:
        for last in statuses:
            bars.update(last)
    return last


# --- commands ------------------------------------------------------------------------------------------

SpecOption = Annotated[Path | None, typer.Option(
    "--spec", exists=True, dir_okay=False,
    help="Pipeline spec YAML (default: every registered phase with its default config).",
)]
RunIdOption = Annotated[str, typer.Option(help="Run id (default: a new one).")]
PresetOption = Annotated[str, typer.Option(
    help="A named pipeline: `tiny` (`make run`'s, 20 minutes on 2 cores), `full` (every phase on its defaults) or "
         "`smoke` (all eight in minutes, for checks).",
)]


def run_here(settings: Settings, pipeline: pipeline_pb2.PipelineSpec, run_id: str = "") -> RunStatus:
    """Run a pipeline embedded in this process with progress bars, archiving its status as it goes."""
    from shared.fabric.embedded import PipelineFailed, run_embedded

    archive = RunArchive.from_settings(settings)
    status: RunStatus | None = None
    with RunProgress() as bars:

        def on_event(envelope: events_pb2.Envelope) -> None:
            nonlocal status
            status = fold(status, envelope)
            archive.save(status)  # `agentforge status` / `watch` in another terminal see it
            if envelope.WhichOneof("payload") == "pipeline_started":
                archive.save_traceparent(envelope.run_id, envelope.trace.traceparent)
            bars.update(status)

        try:
            run_embedded(pipeline, settings=settings, run_id=run_id or None, on_event=on_event)
        except PipelineFailed as error:
            raise fail(str(error)) from error
        except KeyboardInterrupt:
            # Finished phases keep their outputs under deterministic keys: the same command resumes after them.
            console.print("[yellow]interrupted[/yellow]; run the same command again to go on from the last finished phase")
            raise typer.Exit(130) from None
    show_run(status)
    return status


def run(
    spec: SpecOption = None,
    preset: PresetOption = DEFAULT_PRESET,
    run_id: RunIdOption = "",
    headline: Annotated[bool, typer.Option(
        "--headline/--no-headline",
        help="End by measuring the final model against the best specialist and the multitask model on the final "
             "split (`agentforge headline`); runs without Cognate's specialists skip it.",
    )] = True,
) -> None:
    """Run the whole pipeline in this process (embedded mode: local store, in-process bus)."""
    settings = Settings()
    pipeline = load_spec(spec, preset)
    console.print(f"running {len(pipeline.steps)} phase(s) embedded; checkpoints under {settings.local_store}")
    done = run_here(settings, pipeline, run_id)
    console.print(f"[green]run {done.run_id} completed[/green]")
    show_final_files(settings, done)
    if headline:
        from shared.fabric.checkpoint_cli import show_headline

        try:
            show_headline(settings, done)
        except LookupError as error:
            console.print(f"no headline: {error}", highlight=False, soft_wrap=True)


def show_final_files(settings: Settings, status: RunStatus) -> None:
    """Unpack the run's final models (checked against their SHA-256 and manifests) where people can use them,
    and say where: each folder loads in stock transformers; a GGUF beside it runs in llama.cpp."""
    from shared.fabric.local_store import LocalStore
    from shared.fabric.transport import download_checkpoint

    for ref in status.outputs:
        folder = settings.local_store / "final" / status.run_id / ref.name
        if not (folder / "manifest.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)  # a half-written folder from an interrupted unpack
            download_checkpoint(LocalStore(settings.local_store), ref, folder)
        console.print(f"final model {ref.name}: Hugging Face folder {folder}", highlight=False, soft_wrap=True)
        for gguf in sorted(folder.glob("*.gguf")):
            console.print(f"  llama.cpp: {gguf}", highlight=False, soft_wrap=True)


def start(
    spec: SpecOption = None,
    preset: PresetOption = DEFAULT_PRESET,
    run_id: RunIdOption = "",
    watch: Annotated[bool, typer.Option("--watch", help="Follow the run's progress until it ends.")] = False,
) -> None:
    """Start a pipeline run: through the control service if one answers, else straight to Kafka."""
    settings = Settings()
    pipeline = load_spec(spec, preset)
    stub = control_stub(settings)
    if stub is not None:
        response = call(stub.StartPipeline, control_pb2.StartPipelineRequest(spec=pipeline, run_id=run_id))
        started = response.run_id
    elif settings.mode == "distributed":
        started = asyncio.run(_start_on_kafka(settings, pipeline, run_id))
    else:
        raise fail(f"no control service on {settings.grpc_addr} and AGENTFORGE_MODE is embedded: run the pipeline "
                   "here with `agentforge run`, or start `agentforge control` first")
    console.print(f"started run [bold]{started}[/bold] ({len(pipeline.steps)} phases)")
    if watch:
        final = follow(watch_statuses(settings, started))
        if final is not None:
            show_run(final)
    else:
        console.print(f"follow it with `agentforge watch {started}`")


async def _start_on_kafka(settings: Settings, pipeline: pipeline_pb2.PipelineSpec, run_id: str) -> str:
    from shared.fabric.kafka_bus import KafkaBus
    from shared.fabric.pipeline import start_pipeline
    from shared.fabric.tracing import tracer_provider

    topics = Topics.from_settings(settings)
    provider = tracer_provider("agentforge-cli", settings)
    bus = KafkaBus(settings.kafka_bootstrap, client_id="agentforge-cli")
    await bus.start()
    try:
        first = topics.phase_input(load_phase(pipeline.steps[0].phase).name)
        await bus.ensure_topics([topics.runs, first])
        return await start_pipeline(bus, pipeline, topics=topics, run_id=run_id or None, tracer_provider=provider)
    finally:
        await bus.stop()
        provider.shutdown()


def status(run_id: Annotated[str, typer.Argument(help="A run id; without it, every run.")] = "") -> None:
    """Show one run in detail, or list the runs."""
    settings = Settings()
    if run_id:
        show_run(find_run(settings, run_id))
        return
    stub = control_stub(settings)
    if stub is None and settings.mode == "distributed":
        raise no_control_in_distributed(settings)
    runs = list(call(stub.ListRuns, control_pb2.ListRunsRequest()).runs) if stub else newest_archived(settings)
    console.print(runs_table(runs) if runs else "no runs yet")


def newest_archived(settings: Settings) -> list[RunStatus]:
    return newest_first(RunArchive.from_settings(settings).all())


def watch(
    run_id: Annotated[str, typer.Argument(help="The run to follow.")],
    until_completed: Annotated[bool, typer.Option(
        "--until-completed", help="Keep following after a failure, until a redrive completes the run.")] = False,
) -> None:
    """Follow a run's progress live until it completes or fails."""
    final = follow(watch_statuses(Settings(), run_id, until_completed))
    if final is not None:
        show_run(final)
        if final.state == control_pb2.RUN_STATE_FAILED:
            raise typer.Exit(1)


def replay(
    run: Annotated[str, typer.Option("--run", help="The run to replay.")],
    from_phase: Annotated[str, typer.Option("--from", help="The phase to re-run from.")],
    spec: Annotated[Path | None, typer.Option(
        "--spec", exists=True, dir_okay=False,
        help="A corrected spec (same phases, same order) whose steps from --from on replace the run's.",
    )] = None,
) -> None:
    """Re-run a run from a phase, feeding it the stored outputs of the phase before."""
    settings = Settings()
    corrected = load_spec(spec) if spec is not None else None
    stub = control_stub(settings)
    if stub is not None:
        request = control_pb2.ReplayRequest(run_id=run, from_phase=from_phase, spec=corrected)
        started = call(stub.Replay, request).run_id
        console.print(f"replay started as run [bold]{started}[/bold]; follow it with `agentforge watch {started}`")
        return
    if settings.mode == "distributed":
        raise no_control_in_distributed(settings)
    from shared.fabric.control import ReplayError, replay_spec

    try:
        pipeline = replay_spec(archived_run(settings, run), from_phase, corrected)
    except ReplayError as error:
        raise fail(str(error)) from error
    done = run_here(settings, pipeline)
    console.print(f"[green]replay of {run} from {from_phase} completed as run {done.run_id}[/green]")


# --- traces --------------------------------------------------------------------------------------------


def run_traceparent(settings: Settings, run_id: str) -> str:
    """The run's trace context: from its first event (control service), else from the local archive."""
    stub = control_stub(settings)
    if stub is not None:
        events = stub.WatchRun(control_pb2.WatchRunRequest(run_id=run_id))
        try:
            first = next(events)
        except grpc.RpcError as error:
            raise fail(f"control service: {error.code().name}: {error.details()}") from error
        finally:
            events.cancel()
        return first.trace.traceparent
    if settings.mode == "distributed":
        raise no_control_in_distributed(settings)
    return RunArchive.from_settings(settings).load_traceparent(run_id)


def span_summary(otlp: dict[str, Any]) -> list[dict[str, Any]]:
    """Spans of an OTLP JSON trace (Jaeger's /api/v3 answer) in start order: service, name, ms, parent."""
    spans = []
    for resource_spans in otlp.get("result", otlp).get("resourceSpans", []):
        attributes = resource_spans.get("resource", {}).get("attributes", [])
        service = next((a["value"].get("stringValue", "") for a in attributes if a["key"] == "service.name"), "")
        for scope in resource_spans.get("scopeSpans", []):
            for span in scope.get("spans", []):
                start, end = int(span["startTimeUnixNano"]), int(span["endTimeUnixNano"])
                spans.append({
                    "service": service,
                    "name": span["name"],
                    "span_id": span["spanId"],
                    "parent_id": span.get("parentSpanId", ""),
                    "start_ns": start,
                    "duration_ms": (end - start) / 1e6,
                    "error": span.get("status", {}).get("code") in (2, "STATUS_CODE_ERROR"),
                })
    return sorted(spans, key=lambda s: s["start_ns"])


def trace(run_id: Annotated[str, typer.Argument(help="The run whose trace to show.")]) -> None:
    """The run's Jaeger link and a summary of its spans (Jaeger's /api/v3)."""
    settings = Settings()
    if not settings.jaeger_query_url:
        raise fail("AGENTFORGE_JAEGER_QUERY_URL is not set (`agentforge infra env` prints it)")
    traceparent = run_traceparent(settings, run_id)
    if not traceparent:
        raise fail(f"run {run_id} carries no trace context (was tracing configured when it started?)")
    trace_id = traceparent.split("-")[1]
    base = settings.jaeger_query_url.rstrip("/")
    try:
        response = httpx.get(f"{base}/api/v3/traces/{trace_id}", timeout=10)
    except httpx.HTTPError as error:
        raise fail(f"cannot reach Jaeger at {base}: {error}") from error
    console.print(f"trace {trace_id}: {base}/trace/{trace_id}")
    if response.status_code == 404:
        raise fail("Jaeger has no spans of this trace (yet: spans are exported in batches)")
    response.raise_for_status()
    spans = span_summary(response.json())
    known = {s["span_id"] for s in spans}
    table = Table("service", "span", "ms", "parent", "status")
    for s in spans:
        parent = "root" if not s["parent_id"] else ("chained" if s["parent_id"] in known else "missing")
        table.add_row(s["service"], s["name"], f"{s['duration_ms']:.1f}", parent, "error" if s["error"] else "ok")
    console.print(table)


# --- services and dead letters -------------------------------------------------------------------------


def serve(phase: Annotated[str, typer.Argument(help="A registered phase name, or module:Class.")]) -> None:
    """Run a phase as a service: consume its Kafka topic until SIGTERM."""
    from shared.fabric.service import serve_phase

    serve_phase(phase)


def control() -> None:
    """Run the control service (gRPC on Settings.grpc_addr), the run-status view and a health endpoint."""
    from shared.fabric.control import serve_control

    serve_control()


dlq_app = typer.Typer(no_args_is_help=True, help="Dead letters: events a phase gave up on.")


def on_kafka(work: Callable) -> Any:
    """Run work(bus, topics) against the Kafka of the settings; dead letters exist only there."""
    from shared.fabric.kafka_bus import KafkaBus

    settings = Settings()
    if settings.mode != "distributed":
        raise fail("dead letters live on Kafka: set AGENTFORGE_MODE=distributed (`agentforge infra env`)")

    async def main():
        bus = KafkaBus(settings.kafka_bootstrap, client_id="agentforge-cli")
        await bus.start()
        try:
            return await work(bus, Topics.from_settings(settings))
        finally:
            await bus.stop()

    return asyncio.run(main())


def letters_table(letters) -> Table:
    table = Table("letter", "run", "phase", "reason", "attempts", "from", "error")
    for letter in letters:
        where = f"{letter.original_topic}[{letter.original_partition}]@{letter.original_offset}"
        table.add_row(letter.letter_id, letter.run_id, letter.phase, letter.reason, str(letter.attempts), where,
                      letter.error[:120])
    return table


RunOption = typer.Option("", "--run", help="Only the letters of this run id.")
ReasonOption = typer.Option("", "--reason", help="Only letters with this reason, e.g. missing_checkpoint.")
OffsetOption = typer.Option("", "--offset", help="Only this letter: PARTITION:OFFSET as `dlq list` shows, or OFFSET.")


@dlq_app.command("list")
def dlq_list(
    run_id: str = RunOption,
    reason: str = ReasonOption,
    settled: bool = typer.Option(False, "--all", help="Also the letters already redriven or purged."),
) -> None:
    """The dead letters waiting for a redrive or a purge, with where they came from and why."""
    from shared.fabric.dlq import LetterFilter, list_dead_letters

    select = LetterFilter(run_id=run_id, reason=reason)
    letters = on_kafka(lambda bus, topics: list_dead_letters(bus, topics, include_settled=settled))
    letters = [letter for letter in letters if select(letter)]
    console.print(letters_table(letters) if letters else "no dead letters")


@dlq_app.command("redrive")
def dlq_redrive(run_id: str = RunOption, reason: str = ReasonOption, offset: str = OffsetOption) -> None:
    """Republish dead letters (all, or those selected) to their original topic; fix the cause first."""
    from shared.fabric.dlq import LetterFilter, redrive_dead_letters

    select = LetterFilter(run_id=run_id, reason=reason, offset=offset)
    letters = on_kafka(lambda bus, topics: redrive_dead_letters(bus, topics, select=select))
    console.print(letters_table(letters) if letters else "nothing to redrive")
    console.print(f"redrove {len(letters)} dead letter(s)")


@dlq_app.command("purge")
def dlq_purge(
    run_id: str = RunOption,
    reason: str = ReasonOption,
    offset: str = OffsetOption,
    every: bool = typer.Option(False, "--all", help="Purge every waiting letter."),
) -> None:
    """Drop dead letters nobody will redrive (they stay on the topic, settled, for `dlq list --all`)."""
    from shared.fabric.dlq import LetterFilter, purge_dead_letters

    select = LetterFilter(run_id=run_id, reason=reason, offset=offset)
    if select == LetterFilter() and not every:
        raise fail("say which letters to purge (--run, --reason, --offset), or --all")
    letters = on_kafka(lambda bus, topics: purge_dead_letters(bus, topics, select=select))
    console.print(letters_table(letters) if letters else "nothing to purge")
    console.print(f"purged {len(letters)} dead letter(s)")


def register_fabric_commands(app: typer.Typer) -> None:
    for command in (run, start, status, watch, replay, trace, serve, control):
        app.command()(command)
    app.add_typer(dlq_app, name="dlq")
