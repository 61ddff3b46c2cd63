"""Phase 2, EvoMerge: evolve a merge of the Cognate specialists that beats each of them.

Input: the specialists and their shared base, the base named `base_name` ("base"); task-vector methods
need it. Fitness = mean task accuracy - bpb_weight * bits per byte, measured with shared.evaluation on
the validation split; the final table (champion, every parent, the uniform linear merge) uses the test
split, which the search never sees, with more problems per task, and gives the champion's margin over
each of them with a paired 95% bootstrap interval (shared.comparison: the same test problems and text
blocks resampled for both models).

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

from pydantic import Field, field_validator, model_validator

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
from shared.comparison import (
    ItemScores,
    block_bpb,
    correct_differences,
    paired_bootstrap,
    score_blocks,
    task_correctness,
    text_blocks,
)
from shared.evaluation import EvalSuite, evaluate
from shared.phase import ForgedModel, Phase, PhaseConfig, PhaseResult, ProgressFn, no_progress


# Cognate's specialities (services/cognate/mixes.py: reasoning suites at level 1, tool calls at levels 1-2).
# 80 problems a task: the search keeps the best of ~50-100 noisy scores, so a small sample rewards luck
# that the test split does not repeat (measured with 40: a +0.015 validation gain over the text specialist
# shrank to +0.003 on test); with 80 a candidate still scores in seconds on 2 cores (greedy generation is
# most of the cost; answers take at most 12 tokens of our tokenizer, hence 16 new tokens).
SPECIALITIES = (("arithmetic", 1), ("sequence", 1), ("modular", 1), ("word_problems", 1), ("tool_calls", 2))
SPECIALITY_TASKS = tuple((name, level, 80) for name, level in SPECIALITIES)
DEFAULT_VALIDATION = EvalSuite(split="validation", text_split="validation", tasks=SPECIALITY_TASKS, max_new_tokens=16)
# The test table is scored once per model, so it affords most of each task's test pool (modular level 1
# holds 104 problems): the standard error of a mean accuracy falls from about 0.025 (80 a task) to 0.013.
SPECIALITY_TEST_TASKS = tuple((name, level, 100 if name == "modular" else 300) for name, level in SPECIALITIES)
DEFAULT_TEST = EvalSuite(split="test", text_split="test", tasks=SPECIALITY_TEST_TASKS, max_new_tokens=16)


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
    test: EvalSuite = DEFAULT_TEST  # the final table: the validation's tasks and text, on the test split
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

    @model_validator(mode="after")
    def _test_mirrors_validation(self) -> EvoMergeConfig:
        if self.test.split != "test" or self.test.text_split not in ("test", None):
            raise ValueError("the final table is scored on the test split (split and text_split 'test')")
        tasks = {(name, level) for name, level, _ in self.validation.tasks}
        if {(name, level) for name, level, _ in self.test.tasks} != tasks or \
                (self.test.text_split is None) != (self.validation.text_split is None):
            raise ValueError("the test suite must measure what the validation suite does (the same tasks and "
                             "levels, text or no text); set both")
        return self


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


def score_on_test(forged: ForgedModel, suite: EvalSuite, blocks: list[str] | None) -> tuple[dict[str, Any], ItemScores]:
    """The test table of one model (bits per byte from shared.evaluation, each task's accuracy from its
    problems judged one by one) and the per-item scores behind it; `blocks` is the test text cut for the
    paired interval (shared.comparison.text_blocks), None where the suite measures no text."""
    metrics = evaluate(forged.model, forged.tokenizer, suite.model_copy(update={"tasks": ()}))
    correct = task_correctness(forged.model, forged.tokenizer, suite.tasks, suite.max_new_tokens, suite.split, suite.seed)
    accuracies = {f"{name}.{level}.accuracy": sum(flags) / len(flags) for (name, level), flags in correct.items()}
    metrics.update(accuracies)
    if accuracies:
        metrics["tasks.mean_accuracy"] = sum(accuracies.values()) / len(accuracies)
    scored_blocks = score_blocks(forged.model, forged.tokenizer, blocks) if blocks is not None else None
    return metrics, ItemScores(scored_blocks, correct)


def margin_interval(champion: ItemScores, rival: ItemScores, bpb_weight: float) -> dict[str, float]:
    """The champion's fitness minus the rival's, and its paired 95% bootstrap interval: text blocks and each
    task's problems resampled, the same picks for both models. Bits per byte here pool the blocks, so the
    point estimate can differ from the table's margin in the third decimal."""
    differences = [correct_differences(champion.correct[task], rival.correct[task]) for task in champion.correct]
    text = champion.blocks is not None and rival.blocks is not None

    def margin(*picks: list[int]) -> float:
        block_picks, task_picks = (picks[0], picks[1:]) if text else (None, picks)
        value = sum(sum(d[i] for i in p) / len(p) for d, p in zip(differences, task_picks)) / max(1, len(differences))
        if text:
            value -= bpb_weight * (block_bpb(champion.blocks, block_picks) - block_bpb(rival.blocks, block_picks))
        return value

    sizes = ([len(champion.blocks.n_bytes)] if text else []) + [len(d) for d in differences]
    point, low, high = paired_bootstrap(margin, *sizes)
    return {"margin": point, "ci_low": low, "ci_high": high}


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
    version = "3"  # 3: a larger test table with paired intervals; 2: the speciality suite, specialist-alone seeds
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
        test, items = {}, {}
        blocks = text_blocks(config.test.text_split) if config.test.text_split else None
        for m in [merged, *parents, uniform]:
            name = "champion" if m is merged else m.name
            test[name], items[name] = score_on_test(m, config.test, blocks)
        test_fitness = {name: fitness_of(metrics, config.bpb_weight) for name, metrics in test.items()}
        margins = champion_margins(test_fitness)
        intervals = {name: margin_interval(items["champion"], items[name], config.bpb_weight) for name in margins}
        beats_all = all(margin > 0 for margin in margins.values())
        beats_all_significantly = all(interval["ci_low"] > 0 for interval in intervals.values())
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
            "champion_margin_on_test_95pct": intervals,
            "champion_beats_every_parent_and_uniform_with_95pct_significance": beats_all_significantly,
            "evaluations": len(evaluator.cache),
            "search_seconds": search_seconds,
            "workers": config.workers,
            "summary": {
                "champion": f"{champion.stage} {getattr(champion.recipe, 'method', 'layer path')}",
                "champion.test_fitness": round(test_fitness["champion"], 4),
                "smallest_margin_on_test": round(min(margins.values()), 4),
                "champion_beats_every_parent_and_uniform_on_test": beats_all,
                "smallest_margin_95pct_low": round(min(i["ci_low"] for i in intervals.values()), 4),
                "champion_beats_all_with_95pct_significance": beats_all_significantly,
            },
        }
        return PhaseResult(models=[merged], report=report)
