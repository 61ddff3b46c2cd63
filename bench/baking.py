"""Tool and persona baking at tiny scale: the phase on its defaults, without the anchor, and with peft's student.

    .venv/bin/python -m bench.baking                       # a stand-in input (bench.stand_in); about an hour
    .venv/bin/python -m bench.baking --checkpoint DIR      # on Forge's (or BitNet's) output from a run instead

The phase report holds every number: each prompt's screening on validation, the KL of the prompted input to
the input and to the baked model on test trajectories, the behaviour with and without the prompt, the
scorecard and its cost, the ternary check. The second run bakes on the paper's objective alone (no anchor);
the third differs only in the student (peft's LoRA beside each ternary layer, folded and re-ternarized) and
shows what folding such an update costs. This script
keeps what the README shows in bench/results/baking.json, from which bench.readme writes the README block.
"""
from __future__ import annotations

import time
from pathlib import Path

import typer

from bench.results_file import write_results
from bench.stand_in import ternary_input
from services.baking.phase import BakingPhase
from shared.phase import print_every_percent
from shared.scorecard import comparison_figures, without_items

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "baking.json"
# The defaults, then each with one thing changed: no anchor (the paper's objective alone), peft's student.
RUNS = {"default": {}, "no_anchor": {"anchor": False}, "peft_lora": {"student": "peft_lora"}}
cli = typer.Typer(add_completion=False)


def _kept(report: dict) -> dict:
    kept = {key: report[key] for key in ("screening", "baked_prompts", "skipped_prompts", "test", "summary") if key in report}
    if "baking" in report:
        baking = report["baking"]
        kept["baking"] = {key: baking[key] for key in ("student", "fold", "test_kl", "mix", "trajectories", "samples")}
        curve = baking["curve"]
        kept["baking"]["curve"] = {key: curve.get(key) for key in ("eval_steps", "eval_loss", "best_step", "train_seconds")}
        kept["against_input"] = comparison_figures(report["against_input"])
        kept["scorecard_cost"] = report["scorecard_cost"]
        kept["ternary"] = report["ternary"]
    kept["cards"] = {name: without_items(card) for name, card in report["scorecard"]["cards"].items()}
    return kept


@cli.command()
def main(
    checkpoint: Path | None = typer.Option(None, help="input checkpoint (a ternary model); default: the stand-in"),
    seed: int = typer.Option(0, help="seed of the stand-in and of the phase"),
    out: Path = typer.Option(DEFAULT_OUT, help="results file"),
) -> None:
    started = time.perf_counter()
    forged, source = ternary_input(checkpoint, seed)
    phase = BakingPhase()
    runs = {}
    for name, changes in RUNS.items():
        config = phase.parse_config({"seed": seed, **changes})
        typer.echo(f"Baking, run {name} ({changes or 'the defaults'}):")
        runs[name] = {"changes": changes, "config": config.model_dump(mode="json"),
                      **_kept(phase.transform([forged], config, print_every_percent(typer.echo)).report)}
    results = {"command": "python -m bench.baking" + (f" --checkpoint {checkpoint}" if checkpoint else ""),
               "input": source, "seed": seed, "runs": runs}
    write_results(out, results, started)


if __name__ == "__main__":
    cli()
