"""Forge training's figures for `agentforge report`: the curriculum's difficulty by step, and the ablations
(the full run's mean task success minus each run with a mechanism off, with its paired 95% interval)."""
from __future__ import annotations

import matplotlib.pyplot as plt

from shared.scorecard import MEAN_METRIC


def forge_figures(report: dict):
    figures = []
    levels = (((report.get("runs") or {}).get("forge") or {}).get("curriculum") or {}).get("level_per_step") or []
    if levels:
        figure, axes = plt.subplots(figsize=(6, 3.2))
        axes.step(range(1, len(levels) + 1), levels, where="post")
        axes.set(xlabel="step", ylabel="reasoning level fed", title="edge-of-chaos curriculum")
        figure.tight_layout()
        figures.append(("Forge training: difficulty by step", figure))
    ablation = {name: comparison["metrics"][MEAN_METRIC] for name, comparison in (report.get("ablation") or {}).items()
                if MEAN_METRIC in comparison.get("metrics", {})}
    if ablation:
        figure, axes = plt.subplots(figsize=(6, 3.2))
        names = list(ablation)
        differences = [ablation[n]["difference"] for n in names]
        errors = [[d - ablation[n]["ci_low"] for n, d in zip(names, differences)],
                  [ablation[n]["ci_high"] - d for n, d in zip(names, differences)]]
        axes.bar(names, differences, yerr=errors, capsize=3)
        axes.axhline(0.0, color="grey", linewidth=0.5)
        axes.set(ylabel="full run minus ablated (mean task success)", title="Forge training ablations")
        axes.tick_params(axis="x", labelsize=7)
        figure.tight_layout()
        figures.append(("Forge training: ablations", figure))
    return figures
