"""How long the whole pipeline takes, embedded, on this machine: the `smoke` preset and `tiny` (`make run`).

    .venv/bin/python -m bench.pipeline                    # both presets (tiny takes long)
    .venv/bin/python -m bench.pipeline --preset smoke     # one; the others' figures in the file are kept

Each preset runs through run_embedded (what `agentforge run --preset P` calls) into a fresh store, then the
headline `agentforge run` ends with, timed wall clock together; a phase's seconds run from its step's first
event to its completion, from the events' own clocks.
The goals (#16): smoke within 3 minutes, tiny within 20, on 2 cores. Results: bench/results/pipeline.json;
the README's speed block is generated from it (bench/readme.py).
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

from bench.results_file import write_results
from shared.fabric.checkpoint_cli import run_headline
from shared.fabric.cli import load_spec
from shared.fabric.embedded import run_embedded
from shared.fabric.status_view import fold
from shared.settings import Settings

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "pipeline.json"
GOALS_S = {"smoke": 180, "tiny": 1200}
cli = typer.Typer(add_completion=False)


def time_preset(preset: str) -> dict:
    spec = load_spec(None, preset)
    status = None
    first_seen: dict[int, float] = {}
    finished: dict[int, float] = {}
    shown: dict[int, int] = {}

    def on_event(envelope) -> None:
        nonlocal status
        status = fold(status, envelope)
        kind = envelope.WhichOneof("payload")
        at = envelope.created_at.ToNanoseconds() / 1e9
        if kind == "phase_progress":
            step = envelope.phase_progress.step
            first_seen.setdefault(step, at)
            tenth = int(envelope.phase_progress.fraction * 10)
            if tenth > shown.get(step, -1):
                shown[step] = tenth
                typer.echo(f"{preset} {time.perf_counter() - started:5.0f} s {step + 1}/{len(spec.steps)} "
                           f"{spec.steps[step].phase} [{envelope.phase_progress.fraction:4.0%}] "
                           f"{envelope.phase_progress.message}")
        elif kind == "phase_completed":
            finished[envelope.phase_completed.step] = at

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as store:
        settings = Settings(local_store=Path(store))
        run_embedded(spec, settings=settings, on_event=on_event)
        pipeline_seconds = time.perf_counter() - started
        # `agentforge run` ends with the headline: the same measurement, timed here on the test split (the final
        # split is the headline benchmark's alone); a preset without Cognate's specialists has none.
        try:
            run_headline(settings, status, "test")
        except LookupError:
            pass
        seconds = time.perf_counter() - started
    phases = [{"phase": step.phase, "seconds": round(finished[i] - first_seen.get(i, finished[i]), 1)}
              for i, step in enumerate(spec.steps)]
    return {"seconds": round(seconds, 1), "goal_seconds": GOALS_S.get(preset), "phases": phases,
            "headline_seconds": round(seconds - pipeline_seconds, 1),
            "within_goal": preset in GOALS_S and seconds <= GOALS_S[preset]}


@cli.command()
def main(
    preset: Annotated[list[str] | None, typer.Option(help="Presets to time (default: smoke and tiny).")] = None,
    out: Path = DEFAULT_OUT,
) -> None:
    started = time.perf_counter()
    results = json.loads(out.read_text()).get("presets", {}) if out.exists() else {}
    for name in preset or list(GOALS_S):
        results[name] = time_preset(name)
        typer.echo(f"{name}: {results[name]['seconds']} s (goal {results[name]['goal_seconds']} s)")
    write_results(out, {"presets": results}, started)


if __name__ == "__main__":
    cli()
