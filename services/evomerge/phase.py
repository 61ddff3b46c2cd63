"""Phase 2, EvoMerge: evolve a merge of the Cognate specialists that beats each of them.

Input: the specialists and their shared base, the base named `base_name` ("base"); task-vector methods
need it. Fitness = mean task accuracy - bpb_weight * bits per byte, measured with shared.evaluation on
the validation split; the final table (champion, every parent, the uniform linear merge) uses the test
split, which the search never sees, with the champion's margin over each of them.

The default suite measures what Cognate's specialists were trained for, so that a merge has something to
combine: bits per byte (specialist-text), the level-1 reasoning suites (specialist-reasoning) and level-2
calculator calls (specialist-tools). A suite of tasks no parent learned scores every candidate at chance,
leaving bits per byte alone to decide, where the text specialist is best and no merge can beat it.

Output: the champion, whose report carries its recipe (JSON that apply_recipe re-applies to the same
parents), fitness per generation and lineage.
"""
from __future__ import annotations

import time
from typing import Any

from pydantic import Field, field_validator

from services.evomerge.merge_methods import get_method
from services.evomerge.recipe import ParameterSpaceRecipe, apply_recipe
from services.evomerge.search import (
    Evaluator,
    SearchLog,
    StageBudget,
    data_flow_search,
    parameter_space_search,
    seed_recipes,
)
from shared.evaluation import EvalSuite, evaluate
from shared.phase import ForgedModel, Phase, PhaseConfig, PhaseResult, ProgressFn, no_progress


# Cognate's specialities (services/cognate/mixes.py: reasoning suites at level 1, tool calls at levels 1-2).
# 80 problems a task: the search keeps the best of ~50-100 noisy scores, so a small sample rewards luck
# that the test split does not repeat (measured with 40: a +0.015 validation gain over the text specialist
# shrank to +0.003 on test); with 80 a candidate still scores in seconds on 2 cores (greedy generation is
# most of the cost; answers take at most 12 tokens of our tokenizer, hence 16 new tokens).
SPECIALITY_TASKS = (
    ("arithmetic", 1, 80),
    ("sequence", 1, 80),
    ("modular", 1, 80),
    ("word_problems", 1, 80),
    ("tool_calls", 2, 80),
)
DEFAULT_VALIDATION = EvalSuite(split="validation", text_split="validation", tasks=SPECIALITY_TASKS, max_new_tokens=16)


class EvoMergeConfig(PhaseConfig):
    base_name: str = "base"  # the input model that is the specialists' common base
    # The seed round: one recipe per technique; slerp joins only when there are exactly two specialists.
    seed_methods: tuple[str, ...] = ("linear", "slerp", "task_arithmetic", "ties", "dare_ties", "della", "model_stock")
    seed_specialists_alone: bool = True  # also seed each specialist alone (see search.py)
    layer_groups: int = Field(2, ge=1)  # layers share merge parameters within a group
    generations: int = Field(6, ge=0)  # parameter-space CMA-ES budget
    population: int = Field(8, ge=2)
    patience: int = Field(3, ge=1)  # generations without min_improvement before stopping
    min_improvement: float = Field(1e-3, ge=0)
    dfs_generations: int = Field(3, ge=0)  # 0: no data-flow stage
    dfs_population: int = Field(6, ge=2)
    dfs_repeats: int = Field(2, ge=1)  # each model's layers appear this many times among the candidates
    dfs_max_layer_ratio: float = Field(1.5, gt=0)  # longest path allowed, relative to a parent's depth
    bpb_weight: float = Field(1.0, ge=0)
    validation: EvalSuite = DEFAULT_VALIDATION
    workers: int = Field(1, ge=1)  # threads scoring candidates at once (see search.py)

    @field_validator("seed_methods")
    @classmethod
    def _known_methods(cls, methods: tuple[str, ...]) -> tuple[str, ...]:
        if not methods:
            raise ValueError("seed_methods needs at least one merge method")
        for name in methods:
            get_method(name)  # raises UnknownMergeMethodError naming the known ones
        return methods

    @field_validator("validation")
    @classmethod
    def _validation_split(cls, suite: EvalSuite) -> EvalSuite:
        if suite.split == "test" or suite.text_split == "test":
            raise ValueError("the search must not see the test split; it is kept for the final report")
        if suite.text_split is None and not suite.tasks:
            raise ValueError("the validation suite measures nothing (no text split, no tasks)")
        return suite

    def test_suite(self) -> EvalSuite:
        return self.validation.model_copy(
            update={"split": "test", "text_split": "test" if self.validation.text_split else None}
        )


def fitness_of(metrics: dict[str, Any], bpb_weight: float) -> float:
    return metrics.get("tasks.mean_accuracy", 0.0) - bpb_weight * metrics.get("text.bits_per_byte", 0.0)


def seed_label(recipe: ParameterSpaceRecipe) -> str:
    """The technique's name, or "<specialist> alone" for a seed that keeps one specialist's task vector."""
    weights = recipe.groups[0].get("weight", [])
    if recipe.method == "task_arithmetic" and sorted(weights) == [0.0] * (len(weights) - 1) + [1.0]:
        return f"{recipe.models[weights.index(1.0)]} alone"
    return recipe.method


def champion_margins(test_fitness: dict[str, float]) -> dict[str, float]:
    """The champion's test fitness minus each rival's (every parent, the uniform merge): > 0 where it wins."""
    return {name: test_fitness["champion"] - value for name, value in test_fitness.items() if name != "champion"}


def _check_parents(models: list[ForgedModel], base_name: str) -> tuple[ForgedModel, list[ForgedModel]]:
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"input model names must be distinct, got {names}")
    if base_name not in names:
        raise ValueError(f"EvoMerge needs the specialists' base as an input model named {base_name!r}; got {names}")
    base = next(m for m in models if m.name == base_name)
    specialists = [m for m in models if m.name != base_name]
    if len(specialists) < 2:
        raise ValueError(f"EvoMerge needs at least two specialists beside the base, got {len(specialists)}")
    for m in specialists:
        if m.tokenizer.get_vocab() != base.tokenizer.get_vocab():
            raise ValueError(f"{m.name} has a different tokenizer from the base: merging would garble tokens")
        shapes = {n: p.shape for n, p in m.model.named_parameters()}
        if shapes != {n: p.shape for n, p in base.model.named_parameters()}:
            raise ValueError(f"{m.name} does not have the base's architecture (parameter names or shapes differ)")
    return base, specialists


class EvoMergePhase(Phase):
    name = "evomerge"
    version = "2"  # 2: the speciality suite, specialist-alone seeds, DFS started near the PS champion
    Config = EvoMergeConfig

    def transform(self, models: list[ForgedModel], config: EvoMergeConfig, progress: ProgressFn = no_progress) -> PhaseResult:
        base, specialists = _check_parents(models, config.base_name)
        names = [m.name for m in specialists]
        parents = [base, *specialists]
        started = time.perf_counter()

        def score(forged: ForgedModel) -> tuple[float, dict[str, Any]]:
            metrics = evaluate(forged.model, forged.tokenizer, config.validation)
            return fitness_of(metrics, config.bpb_weight), metrics

        evaluator, log = Evaluator(parents, score, config.workers), SearchLog()
        progress(0.0, "scoring the parents and the seed techniques on the validation split")
        parent_scores = {m.name: score(m) for m in parents}
        seeds = seed_recipes(list(config.seed_methods), names, base.name, config.layer_groups, config.seed,
                             config.seed_specialists_alone)
        seeded = evaluator(seeds, "seed", 0, log)
        log.generations.append({"stage": "seed", "generation": 0, "best": max(e.fitness for e in seeded),
                                "mean": sum(e.fitness for e in seeded) / len(seeded), "infeasible": 0,
                                "seconds": sum(e.seconds for e in seeded)})

        best_seed = max(seeded, key=lambda e: e.fitness)
        ps_budget = StageBudget(config.generations, config.population, config.patience, config.min_improvement)
        parameter_space_search(best_seed.recipe, evaluator, log, ps_budget, config.seed,
                               lambda f, msg: progress(0.1 + 0.5 * f, msg))
        ps_champion = max((e for e in log.evaluated if isinstance(e.recipe, ParameterSpaceRecipe)), key=lambda e: e.fitness)

        if config.dfs_generations > 0:
            partner = max(names, key=lambda n: parent_scores[n][0])  # the best specialist on validation
            depth = base.model.config.num_hidden_layers
            dfs_budget = StageBudget(config.dfs_generations, config.dfs_population, config.patience, config.min_improvement)
            data_flow_search(ps_champion.recipe, partner, [depth, depth], config.dfs_repeats,
                             max(1, int(config.dfs_max_layer_ratio * depth)), evaluator, log, dfs_budget,
                             config.seed, lambda f, msg: progress(0.6 + 0.2 * f, msg))

        champion = log.champion
        search_seconds = time.perf_counter() - started
        progress(0.8, "final table on the test split")
        merged = apply_recipe(champion.recipe, parents, name="evomerge")
        uniform = apply_recipe(
            ParameterSpaceRecipe(method="linear", models=tuple(names), groups=({"weight": [1.0] * len(names)},)),
            parents, name="uniform-linear",
        )
        test_suite = config.test_suite()
        test = {m.name if m is not merged else "champion": evaluate(m.model, m.tokenizer, test_suite)
                for m in [merged, *parents, uniform]}
        test_fitness = {name: fitness_of(metrics, config.bpb_weight) for name, metrics in test.items()}
        margins = champion_margins(test_fitness)
        beats_all = all(margin > 0 for margin in margins.values())
        progress(1.0, f"champion: {champion.stage} fitness {champion.fitness:.4f}")

        report = {
            "fitness": f"tasks.mean_accuracy - {config.bpb_weight} * text.bits_per_byte",
            "fitness_per_generation": log.generations,
            "parents_validation": {n: {"fitness": f, **m} for n, (f, m) in parent_scores.items()},
            "seed_round": [{"seed": seed_label(e.recipe), "method": e.recipe.method, "fitness": e.fitness} for e in seeded],
            "champion": {
                "recipe": champion.recipe.model_dump(mode="json"),
                "stage": champion.stage,
                "generation": champion.generation,
                "validation_fitness": champion.fitness,
                "validation": champion.metrics,
                "layers": merged.model.config.num_hidden_layers,
            },
            "lineage": {
                "parents": [m.name for m in parents],
                "seed": seed_label(best_seed.recipe),
                "parameter_space_champion": {"generation": ps_champion.generation, "stage": ps_champion.stage,
                                             "validation_fitness": ps_champion.fitness},
                "final_stage": champion.stage,
            },
            "test": test,
            "test_fitness": test_fitness,
            "champion_margin_on_test": margins,
            "champion_beats_every_parent_and_uniform_on_test": beats_all,
            "evaluations": len(evaluator.cache),
            "search_seconds": search_seconds,
            "workers": config.workers,
            "summary": {
                "champion": f"{champion.stage} {getattr(champion.recipe, 'method', 'layer path')}",
                "champion.test_fitness": round(test_fitness["champion"], 4),
                "smallest_margin_on_test": round(min(margins.values()), 4),
                "champion_beats_every_parent_and_uniform_on_test": beats_all,
            },
        }
        return PhaseResult(models=[merged], report=report)
