"""Evolutionary search for a merge recipe: CMA-ES in parameter space, then over layer paths in data-flow space.

Following mergekit-evolve and Akiba et al. (2024):
1. Seed round: one recipe per merge technique (uniform weights, density 0.5), and one task-arithmetic
   recipe per specialist that is that specialist alone (its weight 1, the others 0), each scored; the best
   is the one evolution tunes. This is the "initial population of technique combinations". The
   single-specialist seeds are our addition (mergekit-evolve starts at weight 1/n): where merging
   interferes, the uniform start can lie below the best parent, and CMA-ES should then search around
   that parent (its weights stay in [0, 1], so "that parent alone" remains expressible).
2. Parameter space (PS): CMA-ES (`cma`, sigma0 = 1/6 on genes scaled to [0, 1]) over per-layer-group
   weights and densities (or slerp's t), starting from the best seed.
3. Data-flow space (DFS): CMA-ES over the indicator array of a layer path through [PS champion, best
   parent] (their layers, repeated `repeats` times; a gene above 0.5 includes its layer) and the two
   crossing scales (genes mapped to [1/2, 2] on a log scale), starting from the PS champion's own path.
Each stage stops at its generation budget or when the best fitness has not risen by `min_improvement`
for `patience` generations. Fitness is whatever `score` measures (the phase scores the validation split).

Parallel fitness: `workers` threads evaluate a generation's candidates at once (torch releases the GIL in
its kernels). On our 2-core machine torch already uses both cores for one model, so workers=1 is the
default and more workers buy little; bench/merge.py measures it rather than assuming.
"""
from __future__ import annotations

import math
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

with warnings.catch_warnings():  # cma's optional plotting needs matplotlib; we never plot
    warnings.filterwarnings("ignore", "Could not import matplotlib.pyplot", UserWarning)
    import cma
import numpy as np

from services.evomerge.merge_methods import get_method
from services.evomerge.merge_methods.dfs import candidate_layers
from services.evomerge.recipe import DataFlowRecipe, ParameterSpaceRecipe, apply_recipe
from shared.phase import ForgedModel, ProgressFn, no_progress

Score = Callable[[ForgedModel], tuple[float, dict[str, Any]]]  # model -> (fitness, measured metrics)
AnyRecipe = ParameterSpaceRecipe | DataFlowRecipe

SIGMA0 = 1 / 6  # mergekit-evolve's initial step on [0, 1] genes
SEED_DENSITY = 0.5  # DARE/TIES densities that work in practice are 0.3-0.5
DENSITY_FLOOR = 0.1  # below this a task vector is mostly gone
SCALE_RANGE = 2.0  # crossing scales live in [1/SCALE_RANGE, SCALE_RANGE]


@dataclass
class Evaluated:
    recipe: AnyRecipe
    fitness: float
    metrics: dict[str, Any]
    stage: str
    generation: int
    seconds: float


@dataclass
class SearchLog:
    evaluated: list[Evaluated] = field(default_factory=list)
    generations: list[dict[str, Any]] = field(default_factory=list)  # per generation: stage, best, mean, time

    @property
    def champion(self) -> Evaluated:
        return max(self.evaluated, key=lambda e: e.fitness)


class Evaluator:
    """Builds and scores recipes, in `workers` threads; never scores the same recipe twice."""

    def __init__(self, parents: list[ForgedModel], score: Score, workers: int = 1) -> None:
        self.parents, self.score, self.workers = parents, score, workers
        self.cache: dict[str, tuple[float, dict[str, Any], float]] = {}

    def _one(self, recipe: AnyRecipe) -> tuple[float, dict[str, Any], float]:
        start = time.perf_counter()
        fitness, metrics = self.score(apply_recipe(recipe, self.parents))
        return fitness, metrics, time.perf_counter() - start

    def __call__(self, recipes: list[AnyRecipe], stage: str, generation: int, log: SearchLog) -> list[Evaluated]:
        keys = [r.model_dump_json() for r in recipes]
        todo = list({k: r for k, r in zip(keys, recipes) if k not in self.cache}.items())
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for (key, _), result in zip(todo, pool.map(self._one, [r for _, r in todo])):
                self.cache[key] = result
        out = [Evaluated(r, *self.cache[k][:2], stage, generation, self.cache[k][2]) for k, r in zip(keys, recipes)]
        log.evaluated.extend(out)
        return out


# --- seeds -------------------------------------------------------------------------------------------


def specialist_alone(models: list[str], base: str, index: int, layer_groups: int, seed: int) -> ParameterSpaceRecipe:
    """Task arithmetic that keeps one specialist's task vector whole and drops the others: that specialist."""
    weights = [1.0 if i == index else 0.0 for i in range(len(models))]
    return ParameterSpaceRecipe(method="task_arithmetic", models=tuple(models), base=base,
                                groups=tuple({"weight": list(weights)} for _ in range(layer_groups)), seed=seed)


def seed_recipes(methods: list[str], models: list[str], base: str, layer_groups: int, seed: int,
                 specialists_alone: bool = True) -> list[ParameterSpaceRecipe]:
    """One recipe per technique with its customary starting parameters, identical in every layer group,
    then (if asked) each specialist alone as a task-arithmetic recipe."""
    recipes = []
    for name in methods:
        method = get_method(name)
        if method.max_models is not None and len(models) > method.max_models:
            continue  # slerp blends exactly two models
        group = {}
        declared = {spec.name for spec in method.parameters}
        if "weight" in declared:
            group["weight"] = [1 / len(models)] * len(models)
        if "density" in declared:
            group["density"] = [SEED_DENSITY] * len(models)
        if "t" in declared:
            group["t"] = 0.5
        recipes.append(
            ParameterSpaceRecipe(
                method=name, models=tuple(models), base=base if method.needs_base else None,
                groups=tuple(dict(group) for _ in range(layer_groups)), seed=seed,
            )
        )
    if specialists_alone:
        recipes += [specialist_alone(models, base, i, layer_groups, seed) for i in range(len(models))]
    return recipes


# --- parameter-space genome ----------------------------------------------------------------------------


def _density_bounds(recipe: ParameterSpaceRecipe) -> tuple[float, float]:
    epsilon = recipe.shared.get("epsilon", 0.15) if recipe.method.startswith("della") else 0.0
    # DELLA needs density +/- epsilon inside (0, 1).
    return max(DENSITY_FLOOR, epsilon + 0.01), (1.0 - epsilon - 0.01) if epsilon else 1.0


def genes_of(recipe: ParameterSpaceRecipe) -> list[tuple[int, str, int | None]]:
    """The searched numbers: (layer group, parameter, model index or None for a shared one)."""
    genes = []
    for g, group in enumerate(recipe.groups):
        for key in ("weight", "density"):
            if key in group:
                genes += [(g, key, i) for i in range(len(recipe.models))]
        if "t" in group:
            genes.append((g, "t", None))
    return genes


def encode(recipe: ParameterSpaceRecipe) -> np.ndarray:
    low, high = _density_bounds(recipe)
    values = []
    for g, key, i in genes_of(recipe):
        value = recipe.groups[g][key] if i is None else recipe.groups[g][key][i]
        values.append((value - low) / (high - low) if key == "density" else value)
    return np.clip(np.array(values, dtype=float), 0.0, 1.0)


def decode(template: ParameterSpaceRecipe, x: np.ndarray) -> ParameterSpaceRecipe:
    low, high = _density_bounds(template)
    groups = [{k: (list(v) if isinstance(v, list) else v) for k, v in group.items()} for group in template.groups]
    for (g, key, i), gene in zip(genes_of(template), np.clip(x, 0.0, 1.0)):
        value = low + float(gene) * (high - low) if key == "density" else float(gene)
        if i is None:
            groups[g][key] = value
        else:
            groups[g][key][i] = value
    for group in groups:
        # A group whose weights all reach zero has no defined normalized merge; keep a trace of each model.
        if "weight" in group and sum(group["weight"]) < 1e-3:
            group["weight"] = [1e-3] * len(group["weight"])
    return template.model_copy(update={"groups": tuple(groups)})


# --- data-flow genome ------------------------------------------------------------------------------------


def decode_path(models: tuple, candidates: list[tuple[int, int]], x: np.ndarray) -> DataFlowRecipe:
    indicators, scale_genes = x[: len(candidates)], x[len(candidates) :]
    scales = [float(SCALE_RANGE ** (2 * gene - 1)) for gene in np.clip(scale_genes, 0.0, 1.0)]
    steps = tuple(c for c, gene in zip(candidates, indicators) if gene > 0.5)
    return DataFlowRecipe(models=models, steps=steps, crossing_scales={"0->1": scales[0], "1->0": scales[1]})


# --- the CMA-ES loop -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageBudget:
    generations: int
    population: int
    patience: int
    min_improvement: float


def cma_stage(
    stage: str,
    x0: np.ndarray,
    to_recipe: Callable[[np.ndarray], AnyRecipe | None],
    evaluate: Evaluator,
    log: SearchLog,
    budget: StageBudget,
    seed: int,
    progress: ProgressFn = no_progress,
) -> None:
    """Ask/tell CMA-ES (minimising -fitness) until the budget or a plateau. to_recipe returns None for an
    infeasible genome, which is told a fitness below every feasible one without being built."""
    options = {"popsize": budget.population, "bounds": [0.0, 1.0], "seed": seed + 1, "verbose": -9}
    strategy = cma.CMAEvolutionStrategy(list(x0), SIGMA0, options)
    best, stale = -math.inf, 0
    for generation in range(budget.generations):
        start = time.perf_counter()
        xs = strategy.ask()
        recipes = [to_recipe(np.asarray(x)) for x in xs]
        feasible = [r for r in recipes if r is not None]
        scored = iter(evaluate(feasible, stage, generation, log))
        fitness = [next(scored).fitness if r is not None else None for r in recipes]
        floor = min([f for f in fitness if f is not None], default=0.0) - 1.0
        strategy.tell(xs, [-(f if f is not None else floor) for f in fitness])
        measured = [f for f in fitness if f is not None]
        generation_best = max(measured, default=-math.inf)
        log.generations.append({
            "stage": stage, "generation": generation, "best": generation_best,
            "mean": float(np.mean(measured)) if measured else None, "infeasible": len(recipes) - len(feasible),
            "seconds": time.perf_counter() - start,
        })
        progress((generation + 1) / budget.generations, f"{stage} generation {generation}: best {generation_best:.4f}")
        if generation_best > best + budget.min_improvement:
            best, stale = generation_best, 0
        else:
            stale += 1
        if stale >= budget.patience or strategy.stop():
            break


def parameter_space_search(
    start: ParameterSpaceRecipe, evaluate: Evaluator, log: SearchLog, budget: StageBudget, seed: int, progress: ProgressFn
) -> None:
    if not genes_of(start):
        return  # e.g. model_stock: nothing to tune
    cma_stage("parameter_space", encode(start), lambda x: decode(start, x), evaluate, log, budget, seed, progress)


def data_flow_search(
    ps_champion: ParameterSpaceRecipe,
    partner: str,
    layer_counts: list[int],
    repeats: int,
    max_layers: int,
    evaluate: Evaluator,
    log: SearchLog,
    budget: StageBudget,
    seed: int,
    progress: ProgressFn,
) -> None:
    models = (ps_champion, partner)
    candidates = candidate_layers(layer_counts, repeats)
    # Start on the PS champion's own path: its layers in the first pass, nothing else; scales 1. Indicators
    # sit 1.5 sigma0 from the 0.5 threshold, so a first-generation sample flips about 7% of the layers (about
    # one of the tiny preset's 16): a local search around a working model. At 0.6/0.4 (0.6 sigma0) every
    # sample flipped about 4 and the measured first generation averaged far below the PS champion.
    x0 = np.array([0.75 if (i < layer_counts[0]) else 0.25 for i in range(len(candidates))] + [0.5, 0.5])

    def to_recipe(x: np.ndarray) -> DataFlowRecipe | None:
        recipe = decode_path(models, candidates, x)
        return recipe if 0 < len(recipe.steps) <= max_layers else None

    cma_stage("data_flow", x0, to_recipe, evaluate, log, budget, seed, progress)
