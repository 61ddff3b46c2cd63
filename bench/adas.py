"""ADAS at tiny scale: the phase on its defaults, with two seeds of the phase, and a picture of the front.

    .venv/bin/python -m bench.adas                       # a stand-in input (bench.stand_in); about half an hour
    .venv/bin/python -m bench.adas --checkpoint DIR      # on baking's (or BitNet's) output from a run instead

The phase report holds every number: the gradient agreement that chose the objective, each expert against
the input on its own family (test split, paired 95% intervals), the held-out task's comparison of the
folded output, the few-shot composition and the routed model with the best single expert, the whole
scorecard, and every point the search evaluated with its front. Seeds differ in the experts' start and
data, the router's fit and both searches; the input is the same. This script keeps what the README shows
in bench/results/adas.json and draws the first seed's front in bench/results/adas_front.png, from which
bench.readme writes the README block.
"""
from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server
import matplotlib.pyplot as plt  # noqa: E402
import typer  # noqa: E402

from bench.results_file import write_results  # noqa: E402
from bench.stand_in import ternary_input  # noqa: E402
from services.adas.phase import AdasPhase  # noqa: E402
from shared.phase import print_every_percent  # noqa: E402
from shared.scorecard import comparison_figures, without_items  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_OUT = RESULTS / "adas.json"
FRONT_PICTURE = RESULTS / "adas_front.png"
SEEDS = (0, 1)
cli = typer.Typer(add_completion=False)


def _kept(report: dict) -> dict:
    kept = {key: report[key] for key in ("adapted_layers", "trainable_per_expert", "sum_min_dimensions", "objective",
                                         "router", "few_shot", "own_family", "experts_beating_input", "held_out",
                                         "ternary", "summary")}
    kept["experts"] = {name: {key: curve.get(key) for key in ("eval_steps", "eval_loss", "best_step", "train_seconds")}
                       for name, curve in report["experts"]["curves"].items()}
    kept["search"] = {key: report["search"][key] for key in ("objectives", "points", "front", "chosen", "choose_by", "groups")}
    kept["against_input"] = {name: comparison_figures(c) for name, c in report["against_input"].items()}
    kept["cards"] = {name: without_items(card) for name, card in report["scorecard"]["cards"].items()}
    return kept


def draw_front(search: dict, out: Path) -> None:
    """Validation task success against adaptive inference's bytes and bits per byte: every evaluated point,
    the front ringed, the input and the point handed on named."""
    points, front, chosen = search["points"], set(search["front"]), search["chosen"]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, (x, label) in zip(axes, (("bytes", "bytes for adaptive inference (MB)"),
                                     ("bits_per_byte", "validation bits per byte")), strict=True):
        scale = 1e6 if x == "bytes" else 1.0
        xs = [p["objectives"][x] / scale for p in points]
        ys = [p["objectives"]["task_success"] for p in points]
        ax.scatter(xs, ys, c="lightgrey", edgecolors="grey", label="evaluated")
        ax.scatter([xs[i] for i in front], [ys[i] for i in front], facecolors="none", edgecolors="tab:blue",
                   s=120, linewidths=1.5, label="Pareto front (4 objectives)")
        ax.scatter([xs[0]], [ys[0]], marker="s", c="black", label="input (no layer adapted)")
        ax.scatter([xs[chosen]], [ys[chosen]], marker="*", c="tab:red", s=200, label="handed on")
        ax.set_xlabel(label)
        ax.set_ylabel("validation mean task success")
    axes[0].legend(loc="best", fontsize=8)
    figure.suptitle("ADAS search: every point NSGA-II evaluated (seed 0)")
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)


@cli.command()
def main(
    checkpoint: Path | None = typer.Option(None, help="input checkpoint (a ternary model); default: the stand-in"),
    seed: int = typer.Option(0, help="seed of the stand-in"),
    out: Path = typer.Option(DEFAULT_OUT, help="results file"),
    picture: Path = typer.Option(FRONT_PICTURE, help="picture of the first seed's front"),
) -> None:
    started = time.perf_counter()
    forged, source = ternary_input(checkpoint, seed)
    phase = AdasPhase()
    runs = {}
    for phase_seed in SEEDS:
        config = phase.parse_config({"seed": phase_seed})
        typer.echo(f"ADAS, seed {phase_seed} (the defaults):")
        report = phase.transform([forged], config, print_every_percent(typer.echo)).report
        runs[str(phase_seed)] = {"config": config.model_dump(mode="json"), **_kept(report)}
    draw_front(runs[str(SEEDS[0])]["search"], picture)
    typer.echo(f"wrote {picture}")
    results = {"command": "python -m bench.adas" + (f" --checkpoint {checkpoint}" if checkpoint else ""),
               "input": source, "seed": seed, "runs": runs}
    write_results(out, results, started)


if __name__ == "__main__":
    cli()
