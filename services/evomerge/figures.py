"""EvoMerge's figure for `agentforge report`: validation fitness by generation, per search stage."""
from __future__ import annotations

import matplotlib.pyplot as plt


def fitness_figure(report: dict):
    rows = report.get("fitness_per_generation") or []
    if not rows:
        return []
    figure, axes = plt.subplots(figsize=(6, 3.2))
    for stage in dict.fromkeys(row["stage"] for row in rows):
        indices = [i for i, row in enumerate(rows) if row["stage"] == stage]
        axes.plot(indices, [rows[i]["best"] for i in indices], marker="o", label=f"{stage}: best")
        axes.plot(indices, [rows[i]["mean"] for i in indices], linestyle="--", label=f"{stage}: mean")
    axes.set(xlabel="generation (all stages in order)", ylabel="validation fitness", title="EvoMerge search")
    axes.legend(fontsize=7)
    figure.tight_layout()
    return [("EvoMerge fitness by generation", figure)]
