"""Quiet-STaR's figure for `agentforge report`: the REINFORCE reward (how much a thought helped) by step."""
from __future__ import annotations

import matplotlib.pyplot as plt


def reward_figure(report: dict):
    reward = ((report.get("training_curve") or {}).get("logged") or {}).get("mean_reward") or []
    if not reward:
        return []
    figure, axes = plt.subplots(figsize=(6, 3.2))
    axes.plot(range(1, len(reward) + 1), reward, linewidth=1)
    axes.axhline(0.0, color="grey", linewidth=0.5)
    axes.set(xlabel="step", ylabel="mean reward", title="Quiet-STaR reward")
    figure.tight_layout()
    return [("Quiet-STaR reward by step", figure)]
