"""Cognate -> EvoMerge -> BitNet on several pipeline seeds, every phase on its defaults, scored on the shared
scorecard (test split), and the per-seed results with their spread written to one file.

    .venv/bin/python -m bench.seeds [--seeds 0 1 2] [--out bench/results/seeds.json] [--work DIR]

A seed changes everything a pipeline draws: the tokenizer's and models' data, initialisations, the
specialists' training seeds, the search and QAT batches. The scored problems and text stay the same for
every seed (the scorecard's own seed), so margins compare across seeds. Each seed's phase reports are kept
in full under --work/seed-N (resumable: a seed whose reports are there is not rerun); --out gets the
headline figures per seed and, per figure, the mean, standard deviation, minimum and maximum over seeds.
The README's result tables are generated from --out by `python -m bench.readme`, never typed in.
About 20 minutes a seed on 2 CPU cores.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import shared  # noqa: F401  first: it sets the OpenMP wait policy before torch loads
import torch
import typer

from services.bitnet.phase import BitNetPhase
from services.cognate.phase import CognatePhase
from services.evomerge.phase import EvoMergePhase
from shared.phase import print_every_percent
from shared.settings import Settings

DEFAULT_OUT = Path(__file__).parent / "results" / "seeds.json"
cli = typer.Typer(add_completion=False)


def run_seed(seed: int, folder: Path) -> dict[str, dict[str, Any]]:
    """The three phase reports of one seed, run (or read back, if all three are on disk)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = ("cognate", "evomerge", "bitnet")
    if all((folder / f"{name}.json").exists() for name in names):
        return {name: json.loads((folder / f"{name}.json").read_text()) for name in names}
    reports, models = {}, []
    for phase in (CognatePhase(), EvoMergePhase(), BitNetPhase()):
        typer.echo(f"seed {seed}: {phase.name}")
        phase_started = time.perf_counter()
        result = phase.transform(models, phase.parse_config({"seed": seed}), print_every_percent(typer.echo))
        result.report["bench_seconds"] = round(time.perf_counter() - phase_started, 1)
        reports[phase.name], models = result.report, result.models
        (folder / f"{phase.name}.json").write_text(json.dumps(result.report))
    return reports


def _metrics(report: dict) -> dict[str, dict[str, dict[str, float]]]:
    """Every card's metrics (value and interval), without the per-item results."""
    return {name: card["metrics"] for name, card in report["scorecard"]["cards"].items()}


def seed_record(seed: int, reports: dict[str, dict]) -> dict[str, Any]:
    """The headline figures of one seed's run."""
    cognate, evomerge, bitnet = reports["cognate"], reports["evomerge"], reports["bitnet"]
    return {
        "seed": seed,
        "seconds": {name: report["bench_seconds"] for name, report in reports.items()},
        "cognate": {"models": _metrics(cognate),
                    "specialist_best_on_speciality": {n: s["best_with_95pct_significance"]
                                                      for n, s in cognate["speciality"].items()}},
        "evomerge": {"champion": evomerge["summary"]["champion"],
                     "recipe": evomerge["champion"]["recipe"],
                     "models": _metrics(evomerge),
                     "fitness": evomerge["test_fitness"],
                     "margins": {name: {**interval, "relation": evomerge["comparisons"][name]["relation"]}
                                 for name, interval in evomerge["champion_margin_on_test_95pct"].items()},
                     "beats_every_parent_and_uniform_95pct":
                         evomerge["champion_beats_every_parent_and_uniform_with_95pct_significance"]},
        "bitnet": {"models": _metrics(bitnet),
                   "qat_gap": {reference: {"relation": gap["relation"],
                                           "metrics": {m: gap["metrics"][m] for m in gap["headline"]}}
                               for reference, gap in bitnet["qat_gap"].items()},
                   "tool_use": bitnet["tool_use"],
                   "packed_file_bytes": bitnet["summary"]["packed_file_bytes"],
                   "float_file_bytes": bitnet["summary"]["float_file_bytes"],
                   "ternary_bits_per_weight": bitnet["summary"]["ternary_bits_per_weight"]},
    }


def _spread(numbers: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(numbers), "sd": statistics.stdev(numbers) if len(numbers) > 1 else 0.0,
            "min": min(numbers), "max": max(numbers), "n": len(numbers)}


def spread(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per figure, its spread over seeds: every model's metric values per phase, the champion's margins and
    fitness, QAT's gaps."""
    out: dict[str, Any] = {}
    for phase in ("cognate", "evomerge", "bitnet"):
        models = records[0][phase]["models"]
        out[phase] = {model: {metric: _spread([r[phase]["models"][model][metric]["value"] for r in records])
                              for metric in metrics} for model, metrics in models.items()}
    margins = records[0]["evomerge"]["margins"]
    out["evomerge_margins"] = {name: {**_spread([r["evomerge"]["margins"][name]["margin"] for r in records]),
                                      "seeds_significant": sum(r["evomerge"]["margins"][name]["ci_low"] > 0 for r in records)}
                               for name in margins}
    out["qat_gap"] = {reference: {metric: _spread([r["bitnet"]["qat_gap"][reference]["metrics"][metric]["difference"]
                                                   for r in records])
                                  for metric in gap["metrics"]}
                      for reference, gap in records[0]["bitnet"]["qat_gap"].items()}
    out["tool_use_loss"] = _spread([r["bitnet"]["tool_use"]["loss"] for r in records])
    return out


@cli.command()
def main(
    seeds: list[int] = typer.Option([0, 1, 2], help="pipeline seeds"),
    out: Path = typer.Option(DEFAULT_OUT, help="the results file the README's tables are generated from"),
    work: Path = typer.Option(None, help="full reports per seed (default: the cache's bench/seeds folder)"),
) -> None:
    work = work or Settings().cache_dir / "bench" / "seeds"
    started = time.perf_counter()
    records = [seed_record(seed, run_seed(seed, work / f"seed-{seed}")) for seed in seeds]
    result = {
        "what": "Cognate -> EvoMerge -> BitNet on their defaults (the tiny model, as the full preset runs them), "
                "scored on the shared scorecard, test split",
        "command": "python -m bench.seeds --seeds " + " ".join(map(str, seeds)),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "seeds": records,
        "spread": spread(records),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
    typer.echo(f"{len(seeds)} seeds in {time.perf_counter() - started:.0f} s; results in {out}")
    for name, margin in result["spread"]["evomerge_margins"].items():
        typer.echo(f"champion's margin over {name:22} {margin['mean']:+.4f} +/- {margin['sd']:.4f} "
                   f"(95% interval above 0 in {margin['seeds_significant']} of {margin['n']} seeds)")
    typer.echo(f"QAT's loss of tool-call success: {result['spread']['tool_use_loss']['mean']:+.3f} "
               f"+/- {result['spread']['tool_use_loss']['sd']:.3f}")


if __name__ == "__main__":
    cli()
