"""The checkpoint commands of `agentforge`: lineage (where a checkpoint came from), generate (talk to it)
and report (a run's HTML page with its plots, shared/report.py).

Both name a checkpoint of a run as RUN_ID (its final output), RUN_ID:STEP (a step by index or phase name)
or RUN_ID:STEP:NAME (shared.fabric.lineage); generate also takes a checkpoint folder. Runs are found as
`status` finds them: through the control service, else in this machine's archive of embedded runs.
"""
from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from transformers import TextStreamer

from shared.checkpoint import MANIFEST, load_checkpoint
from shared.data.splits import FINAL
from shared.evaluation import greedy_continuations
from shared.fabric.cli import console, fail, find_run
from shared.fabric.lineage import lineage, parse_reference, pick, read_archive, store_for
from shared.fabric.phases import load_phase
from shared.fabric.status_view import state_name
from shared.fabric.transport import download_checkpoint
from shared.phase import ForgedModel, ProgressFn, as_measured, available_phases, no_progress, print_every_percent
from shared.settings import Settings
from shared.tool_runtime import first_stop, run_with_tools

ReferenceArgument = Annotated[str, typer.Argument(
    help="RUN_ID (the run's final output), RUN_ID:STEP (index or phase name) or RUN_ID:STEP:NAME.",
)]


def resolve(settings: Settings, reference: str):
    """The run and the checkpoint of it that `reference` names, or a clear error."""
    try:
        run_id, step, name = parse_reference(reference)
        status = find_run(settings, run_id)
        return status, pick(status, step, name)
    except (ValueError, LookupError) as error:
        raise fail(str(error)) from error


def lineage_command(
    reference: ReferenceArgument,
    configs: Annotated[bool, typer.Option("--configs", help="Print each phase's whole config as JSON.")] = False,
) -> None:
    """Print the chain of checkpoints, phases, configs and digests that produced a checkpoint, from the manifests."""
    settings = Settings()
    status, chosen = resolve(settings, reference)
    table = Table("step", "phase", "checkpoint", "digest", "config", "parents")
    links = list(lineage(status, lambda uri: store_for(settings, uri), chosen))
    for link in links:
        m = link.manifest
        if m is None:
            table.add_row("-", "(not made by this run)", "", link.digest[:12], "", "")
            continue
        table.add_row(str(link.produced.step), f"{m.phase} v{m.code_version}", m.name, link.digest[:12],
                      m.config_hash[:8], " ".join(parent[:12] for parent in m.parents) or "none")
    console.print(f"[bold]lineage of {chosen.ref.name}[/bold] (run {status.run_id}, step {chosen.step}, {chosen.phase})")
    console.print(table)
    if configs:
        for link in links:
            if link.manifest is not None:
                console.print(f"[bold]{link.manifest.phase}[/bold] → {link.manifest.name} config:")
                console.print_json(json.dumps(link.manifest.config, sort_keys=True))


def load_for_generation(settings: Settings, checkpoint: str, folder: Path) -> tuple[ForgedModel, str]:
    """The model of a checkpoint folder or a run's checkpoint (downloaded into `folder`), and what it is."""
    path = Path(checkpoint)
    if not (path / MANIFEST).is_file():
        status, chosen = resolve(settings, checkpoint)
        path = folder / "checkpoint"
        download_checkpoint(store_for(settings, chosen.ref.uri), chosen.ref, path)
        checkpoint = f"{chosen.ref.name} (run {status.run_id}, step {chosen.step}, {chosen.phase})"
    forged, _ = load_checkpoint(path)
    return ForgedModel(as_measured(forged), forged.tokenizer, forged.name, forged.carried), checkpoint


def thinking_model(forged: ForgedModel):
    """The model wrapped to think, by the phase whose additions it carries; None if it carries none."""
    for name in available_phases():
        if (model := load_phase(name).thinking_model(forged)) is not None:
            return model
    return None


class StopAwareStreamer(TextStreamer):
    """transformers' TextStreamer, printing the new text only up to the runtime's first stop string (the
    runtime cuts there: a token may run past it)."""

    def __init__(self, tokenizer, stops: Sequence[str]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stops, self.text, self.printed = stops, "", 0

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.text += text
        visible = first_stop(self.text, self.stops)
        print(visible[self.printed:], end="", flush=True)
        self.printed = len(visible)


class StreamingGenerate:
    """The tool runtime's generate for one prompt, printing each token as it comes and each calculator
    result the runtime splices in between rounds."""

    def __init__(self, model, tokenizer, prompt: str) -> None:
        self.model, self.tokenizer, self.shown = model, tokenizer, prompt

    def __call__(self, prompts: Sequence[str], max_new_tokens: int, stops: Sequence[str]) -> list[str]:
        (prompt,) = prompts
        print(prompt[len(self.shown):], end="", flush=True)  # the runtime's result since the last round
        (continuation,) = greedy_continuations(self.model, self.tokenizer, [prompt], max_new_tokens, 1,
                                               stop_strings=stops, streamer=StopAwareStreamer(self.tokenizer, stops))
        self.shown = prompt + first_stop(continuation, stops)
        return [continuation]


def generate_command(
    checkpoint: Annotated[str, typer.Argument(help="A checkpoint folder, or RUN_ID[:STEP[:NAME]].")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The text to continue.")],
    think: Annotated[bool | None, typer.Option(
        "--think/--no-think", help="Think before each token (default: where the model carries Quiet-STaR's head).",
    )] = None,
    tools: Annotated[bool, typer.Option("--tools/--no-tools", help="Execute calculator calls as the model writes them.")] = True,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens per round (per calculator call).")] = 48,
    max_calls: Annotated[int, typer.Option(min=0, help="Calculator calls executed at most.")] = 2,
) -> None:
    """Continue a prompt with a checkpoint of a run, greedily, streaming the text as it comes."""
    settings = Settings()
    with tempfile.TemporaryDirectory() as folder:
        forged, what = load_for_generation(settings, checkpoint, Path(folder))
    thinking = thinking_model(forged) if think is not False else None
    if think and thinking is None:
        raise fail(f"{what} carries no thinking (no Quiet-STaR mixing head): run it with --no-think")
    model = forged.model if thinking is None else thinking
    console.print(f"[dim]{what}; thinking {'on' if thinking is not None else 'off'}, tools "
                  f"{'on' if tools else 'off'}[/dim]", highlight=False)
    generate = StreamingGenerate(model, forged.tokenizer, prompt)
    print(prompt, end="", flush=True)
    transcript, = run_with_tools(generate, [prompt], max_new_tokens, max_calls if tools else 0)
    print(flush=True)
    if transcript.calls:
        console.print(f"[dim]calculator: {', '.join(f'{c} = {r}' for c, r in zip(transcript.calls, transcript.results, strict=True))}[/dim]",
                      highlight=False)


def report_command(
    run_id: Annotated[str, typer.Argument(help="The run to report on.")],
    out: Annotated[Path | None, typer.Option(help="Where to write the page (default: under the local store).")] = None,
) -> None:
    """Write a self-contained HTML report of a run: each phase's curves and plots, and the size/quality staircase."""
    from shared.report import model_bytes, output_points, render

    settings = Settings()
    status = find_run(settings, run_id)
    steps, points = [], []
    for done in status.completed_steps:
        report = json.loads(done.report_json or "{}")
        steps.append({"step": done.step, "phase": done.phase, "report": report})
        success = output_points(report)
        for ref in done.outputs:
            # A card named after the model, else the step's one output card (EvoMerge's "champion", ...).
            value = success.get(ref.name, next(iter(success.values())) if len(done.outputs) == 1 and success else None)
            if value is not None:
                archive = read_archive(store_for(settings, ref.uri), ref)
                points.append({"step": done.step + 1, "phase": done.phase, "model": ref.name,
                               "bytes": model_bytes(archive.sizes), "success": value})
    spec_phases = {index: step.phase for index, step in enumerate(status.spec.steps)}

    def figures_of(step: dict):
        return load_phase(spec_phases.get(step["step"], step["phase"])).figures(step["report"])

    page = render({"run_id": status.run_id, "spec": status.spec.name or "run", "state": state_name(status.state)},
                  steps, points, figures_of)
    out = out or settings.local_store / "reports" / f"{status.run_id}.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    console.print(f"report of run {status.run_id}: {out}", highlight=False, soft_wrap=True)


def cognate_report(status) -> dict:
    """The report of the run's Cognate step (the models the headline compares with came from it)."""
    cognate = [done for done in status.completed_steps if done.phase == "cognate"]
    if not cognate:
        raise LookupError(f"run {status.run_id} has no Cognate step: its headline needs the models it started from")
    return json.loads(cognate[0].report_json or "{}")


def _contender(settings: Settings, chosen, name: str, folder: Path):
    from shared.headline import Contender
    from shared.report import model_bytes

    path = folder / name
    download_checkpoint(store_for(settings, chosen.ref.uri), chosen.ref, path)
    forged, _ = load_checkpoint(path)
    # The unpacked files are the archive's members: their sizes, without downloading the archive again.
    sizes = {file.relative_to(path).as_posix(): file.stat().st_size for file in path.rglob("*") if file.is_file()}
    return Contender(name, as_measured(forged), forged.tokenizer, model_bytes(sizes))


def headline_contenders(settings: Settings, status, folder: Path) -> list:
    """The run's final model, then the best Cognate specialist (by Cognate's own test-split mean task success,
    never the final split) and Cognate's baselines among its outputs (the multitask model), loaded as
    measured, each with its bytes on disk (shared.headline.Contender)."""
    from shared.scorecard import MEAN_METRIC

    report = cognate_report(status)
    cards = report.get("scorecard", {}).get("cards", {})
    specialists = [name for name in report.get("speciality", {}) if name in cards]
    if not specialists:
        raise LookupError(f"run {status.run_id}'s Cognate step scored no specialists: no headline to measure")
    best = max(specialists, key=lambda name: cards[name]["metrics"][MEAN_METRIC]["value"])
    made = {ref.name for done in status.completed_steps if done.phase == "cognate" for ref in done.outputs}
    baselines = [name for name in report["scorecard"].get("baselines", []) if name in made]
    final = pick(status)
    return [_contender(settings, final, f"{final.ref.name} (forged)", folder),
            *(_contender(settings, pick(status, "cognate", name), name, folder) for name in [best, *baselines])]


def run_headline(settings: Settings, status, split: str, progress: ProgressFn = no_progress) -> dict:
    """The run's headline (shared.headline.measure) on `split`."""
    from shared.headline import measure

    with tempfile.TemporaryDirectory() as folder:
        return measure(headline_contenders(settings, status, Path(folder)), split, progress=progress)


def show_headline(settings: Settings, status, split: str = FINAL) -> None:
    """Measure and print a run's headline, and keep it as JSON beside the run's reports."""
    from shared.headline import table_lines

    console.print(f"measuring the headline on the {split} split (the forged model against the models it started from)")
    headline = run_headline(settings, status, split, print_every_percent(lambda line: console.print(line, highlight=False)))
    out = settings.local_store / "reports" / f"{status.run_id}-headline-{split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(headline, indent=1))
    console.print("\n".join(table_lines(headline)), highlight=False, soft_wrap=True, markup=False)
    console.print(f"headline of run {status.run_id} ({split} split): {out}", highlight=False, soft_wrap=True)


def headline_command(
    run_id: Annotated[str, typer.Argument(help="The run to measure.")],
    split: Annotated[str, typer.Option(help="final (the sealed split, read only here and by the headline "
                                            "benchmark) or test (development).")] = FINAL,
) -> None:
    """The run's final model against the best specialist and the multitask baseline it started from:
    bytes, bits per byte and mean task success with 95% intervals, tokens per second, paired differences."""
    if split not in (FINAL, "test"):
        raise fail(f"the headline reads the final split, or the test split for development; not {split!r}")
    settings = Settings()
    status = find_run(settings, run_id)
    try:
        show_headline(settings, status, split)
    except LookupError as error:
        raise fail(str(error)) from error


def register_checkpoint_commands(app: typer.Typer) -> None:
    app.command("headline")(headline_command)
    app.command("lineage")(lineage_command)
    app.command("generate")(generate_command)
    app.command("report")(report_command)
