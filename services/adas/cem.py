"""Few-shot adaptation: the cross-entropy method over the experts' mixing weights, as the reference does it.

For a task no expert was trained on, the reference searches alpha (one weight per expert, each in [0, 1],
normalised when mixed: svf.mixed_multipliers) on a few of the task's problems: a Gaussian starting at equal
weights with standard deviation half the range, a population of 32 clamped to the range with the best so
far re-evaluated in it, the elite 20% giving the next mean and standard deviation, ties in success broken
by the likelihood of the right answers (optim_modules.CEM, use_loglikelihood_for_ties). The method is that
loop itself, a few lines, so it is written here; the multi-objective search is pymoo's (search.py).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

# alpha -> (success on the few-shot problems, mean log-likelihood of their right answers): higher is better.
FewShotScore = Callable[[np.ndarray], tuple[float, float]]


class CEMConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    population: int = Field(32, ge=2)
    elite_ratio: float = Field(0.2, gt=0, le=1)
    generations: int = Field(3, ge=1)
    shots: int = Field(32, ge=1)  # validation problems of the task the search sees


def cem(score: FewShotScore, experts: int, config: CEMConfig, seed: int) -> dict:
    """The best alpha found and every generation's scores."""
    rng = np.random.default_rng(seed)
    elites = max(1, int(config.elite_ratio * config.population))
    mean, std = np.full(experts, 1.0 / experts), np.full(experts, 0.5)
    best, best_score = mean.copy(), score(mean)
    history = []
    for _ in range(config.generations):
        population = np.clip(rng.normal(mean, std, size=(config.population, experts)), 0.0, 1.0)
        population[0] = best
        scores = [score(alpha) for alpha in population]
        winner = max(range(len(scores)), key=lambda i: scores[i])
        if scores[winner] >= best_score:
            best, best_score = population[winner].copy(), scores[winner]
        elite = population[np.argsort([s[0] for s in scores], kind="stable")[-elites:]]
        mean, std = elite.mean(0), elite.std(0, ddof=1) if elites > 1 else std
        history.append({"success": [s[0] for s in scores], "best_success": best_score[0]})
    return {"alpha": best.tolist(), "success": best_score[0], "loglikelihood": best_score[1], "generations": history}
