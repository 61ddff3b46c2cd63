"""The multi-objective search over a composition: which layers adapt, and how the experts mix.

A point is a gate per layer group (a block's attention or MLP; the group adapts where its gate is above
0.5) and one mixing weight per expert (svf.mixed_multipliers); all in [0, 1]. Its objectives, all
minimised and all measured on the point's folded model (search.py knows nothing of how; phase.py's
`measure_point` does it): minus the validation task success, validation bits per byte, the bytes adaptive
inference needs (the packed ternary file, and per adapted matrix its SVD factors and every expert's vector),
and the latency of adapting (composing and re-ternarizing the adapted matrices, measured).

NSGA-II is pymoo's. Every point it evaluates is kept, and the Pareto front reported is the non-dominated
set of all of them (pymoo's non-dominated sorting), so every point on it was evaluated. The first
population holds the input itself (no gate open) and every layer adapting with equal weights.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.problem import Problem
from pymoo.optimize import minimize
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

OBJECTIVES = ("task_success", "bits_per_byte", "bytes", "latency_ms")
MAXIMISED = {"task_success"}
GROUP = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.")


class SearchConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    population: int = Field(12, ge=4)
    generations: int = Field(4, ge=1)
    problems: int = Field(64, ge=1)  # validation problems per expert task
    text_blocks: int = Field(3, ge=1)  # validation text blocks for bits per byte
    # The point handed on: the front's best by these objectives in turn (ties broken by the next).
    choose_by: tuple[str, ...] = ("task_success", "bits_per_byte", "bytes", "latency_ms")


def layer_groups(names: Sequence[str]) -> dict[str, list[str]]:
    """Adapted layer names by group ("layers.0.mlp"), in model order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        match = GROUP.search(name)
        groups.setdefault(f"layers.{match[1]}.{match[2]}" if match else name, []).append(name)
    return groups


def decode(x: np.ndarray, groups: Sequence[str], experts: Sequence[str]) -> dict:
    gates, alphas = x[: len(groups)], x[len(groups):]
    return {"groups": [g for g, gate in zip(groups, gates, strict=True) if gate > 0.5],
            "alpha": {e: round(float(a), 4) for e, a in zip(experts, alphas, strict=True)}}


def _minimised(objectives: dict) -> list[float]:
    return [-objectives[name] if name in MAXIMISED else objectives[name] for name in OBJECTIVES]


def pareto_front(points: Sequence[dict]) -> list[int]:
    """Indices of the points no other point dominates (on OBJECTIVES)."""
    values = np.array([_minimised(p["objectives"]) for p in points])
    return sorted(int(i) for i in NonDominatedSorting().do(values, only_non_dominated_front=True))


def choose(points: Sequence[dict], front: Sequence[int], choose_by: Sequence[str]) -> int:
    """The front's point that is best by choose_by's objectives in turn."""
    def key(i: int) -> tuple:
        objectives = points[i]["objectives"]
        return tuple(-objectives[n] if n in MAXIMISED else objectives[n] for n in choose_by)
    return min(front, key=key)


def search(measure: Callable[[dict], dict], groups: Sequence[str], experts: Sequence[str], config: SearchConfig,
           seed: int, progress=lambda f, m: None) -> dict:
    """Run NSGA-II; `measure` takes a decoded point and returns its objectives. Every evaluated point, the
    front, and the chosen point."""
    points: list[dict] = []
    seen: dict[str, dict] = {}
    budget = config.population * config.generations

    def evaluate(x: np.ndarray) -> list[float]:
        point = decode(x, groups, experts)
        key = repr(point if point["groups"] else {"groups": []})  # with no group adapting the mix is moot
        if key not in seen:
            seen[key] = {**point, "objectives": measure(point)}
            points.append(seen[key])
            progress(min(1.0, len(points) / budget), f"search: point {len(points)}, "
                     f"{len(point['groups'])} groups, success {seen[key]['objectives']['task_success']:.3f}")
        return _minimised(seen[key]["objectives"])

    class Composition(Problem):
        def __init__(self):
            super().__init__(n_var=len(groups) + len(experts), n_obj=len(OBJECTIVES), xl=0.0, xu=1.0)

        def _evaluate(self, x, out, *args, **kwargs):
            out["F"] = np.array([evaluate(row) for row in x])

    rng = np.random.default_rng(seed)
    first = rng.random((config.population, len(groups) + len(experts)))
    first[0, : len(groups)] = 0.0  # the input
    first[1] = np.r_[np.ones(len(groups)), np.full(len(experts), 1.0 / len(experts))]  # all adapt, equal mix
    minimize(Composition(), NSGA2(pop_size=config.population, sampling=first), ("n_gen", config.generations),
             seed=seed, verbose=False)
    front = pareto_front(points)
    return {"objectives": list(OBJECTIVES), "points": points, "front": front,
            "chosen": choose(points, front, config.choose_by), "choose_by": list(config.choose_by)}
