"""ADAS's figure for `agentforge report`: the search's compositions by task success and bits per byte, the
Pareto front joined, the chosen one marked."""
from __future__ import annotations

import matplotlib.pyplot as plt


def front_figure(report: dict):
    search = report.get("search") or {}
    points = search.get("points") or []
    if not points:
        return []
    figure, axes = plt.subplots(figsize=(6, 3.6))
    success = [p["objectives"]["task_success"] for p in points]
    bpb = [p["objectives"]["bits_per_byte"] for p in points]
    axes.scatter(bpb, success, s=12, color="lightgrey", label="compositions")
    front = sorted(search.get("front") or [], key=lambda i: bpb[i])
    axes.plot([bpb[i] for i in front], [success[i] for i in front], marker="o", label="Pareto front")
    if (chosen := search.get("chosen")) is not None:
        axes.scatter([bpb[chosen]], [success[chosen]], s=60, marker="*", color="red", label="chosen", zorder=3)
    axes.set(xlabel="bits per byte (validation)", ylabel="task success (validation)", title="ADAS search")
    axes.legend(fontsize=7)
    figure.tight_layout()
    return [("ADAS Pareto front", figure)]
