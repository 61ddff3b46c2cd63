"""Forge training at tiny scale: the phase on its defaults with the ablation runs, on the test split.

    .venv/bin/python -m bench.forge                       # about half an hour on 2 cores
    .venv/bin/python -m bench.forge --checkpoint DIR      # on BitNet's output from a run instead

Without --checkpoint the input is a stand-in for the pipeline's BitNet output (bench.stand_in). The phase report itself holds every number (it trains the output, each mechanism off in
turn and all off, at equal steps, data and seed, and scores each on the shared scorecard); this script keeps
what the README shows in bench/results/forge.json, from which bench.readme writes the README's Forge block.
"""
from __future__ import annotations

import time
from pathlib import Path

import typer

from bench.results_file import write_results
from bench.stand_in import ternary_input
from services.forge.phase import ForgePhase
from shared.phase import print_every_percent
from shared.scorecard import comparison_figures, without_items

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "forge.json"
cli = typer.Typer(add_completion=False)


def _run_figures(run: dict) -> dict:
    curve = run["curve"]
    kept = {"switches": run["switches"], "rows_fed": run["rows_fed"], "train_loss": curve["train_loss"],
            "eval_steps": curve["eval_steps"], "eval_loss": curve["eval_loss"], "train_seconds": curve["train_seconds"]}
    if "curriculum" in run:
        kept["curriculum"] = {key: run["curriculum"][key] for key in ("band", "measurements", "level_per_step")}
    if "logged" in curve:
        kept["self_model"] = {name: curve["logged"][name] for name in ("self_model_mse", "own_loss_variance")}
    return kept


@cli.command()
def main(
    checkpoint: Path | None = typer.Option(None, help="input checkpoint (BitNet's output); default: a stand-in"),
    seed: int = typer.Option(0, help="seed of the stand-in and of the phase"),
    out: Path = typer.Option(DEFAULT_OUT, help="results file"),
) -> None:
    started = time.perf_counter()
    forged, source = ternary_input(checkpoint, seed)
    phase = ForgePhase()
    config = phase.parse_config({"seed": seed})
    typer.echo("Forge on its defaults, with the ablation runs:")
    report = phase.transform([forged], config, print_every_percent(typer.echo)).report
    section = report["scorecard"]
    results = {
        "command": "python -m bench.forge" + (f" --checkpoint {checkpoint}" if checkpoint else ""),
        "input": source, "seed": seed, "config": config.model_dump(mode="json"),
        "test": {"cards": {name: without_items(card) for name, card in section["cards"].items()}, "spec": section["spec"],
                 "against_input": {**comparison_figures(report["against_input"]),
                                   "beats_input": report["against_input"]["beats_input"]},
                 "ablation": {name: comparison_figures(c) for name, c in report["ablation"].items()}},
        "held_out_loss": report["held_out_loss"],
        "runs": {name: _run_figures(run) for name, run in report["runs"].items()},
        "ternary": report["ternary"],
    }
    write_results(out, results, started)


if __name__ == "__main__":
    cli()
