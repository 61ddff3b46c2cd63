"""Phase 2, EvoMerge: evolve a merge of the Cognate specialists that beats each of them.

Input: the specialists and their shared base, the base named `base_name` ("base"); task-vector methods
need it. Input models named in `baselines` (Cognate's "multitask") are scored beside the champion and never
merged. Fitness = mean task success - bpb_weight * bits per byte, measured on the shared scorecard
(shared.scorecard) over the validation split; the final table (champion, every input, the uniform linear
merge) is the phase scorecard on the test split, which the search never sees, and gives the champion's
fitness margin over each model with a paired 95% bootstrap interval (the same test problems and text
blocks resampled for both) and, beside that scalar, the Pareto relation over the scorecard's metrics.

The scorecard measures what Cognate's specialists were trained for, so a merge has something to combine:
bits per byte (specialist-text), the level-1 reasoning suites (specialist-reasoning) and level-2 calculator
requests, executed by the tool runtime and scored on the final answer (specialist-tools).

Output: the champion, whose report carries its recipe (JSON that apply_recipe re-applies to the same
parents), fitness per generation and lineage.
"""
from __future__ import annotations

import time
from typing import Any

from pydantic import Field, field_validator, model_validator

from services.evomerge.merge_methods import get_method
from services.evomerge.mergekit_export import champion_as_mergekit
from services.evomerge.recipe import ParameterSpaceRecipe, apply_recipe
from services.evomerge.search import (
    Evaluator,
    SearchLog,
    StageBudget,
    data_flow_search,
    parameter_space_search,
    seed_recipes,
)
from shared.comparison import percentile_interval
from shared.phase import ForgedModel, Phase, PhaseConfig, PhaseResult, ProgressFn, no_progress
from shared.scorecard import (
    HEADLINE_TASKS,
    MEAN_METRIC,
    TEXT_METRIC,
    ScorecardSpec,
    compare,
    metric_draws,
    report_section,
    score,
    values,
)

# 80 problems a task on validation: the search keeps the best of ~50-100 noisy scores, so a small sample
# rewards luck that the test split does not repeat (measured with 40: a +0.015 validation gain over the text
# specialist shrank to +0.003 on test); with 80 a candidate still scores in seconds on 2 cores.
VALIDATION_PROBLEMS = 80
DEFAULT_VALIDATION = ScorecardSpec(split="validation", tasks=tuple((s, lv, VALIDATION_PROBLEMS) for s, lv, _ in HEADLINE_TASKS))


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
    validation: ScorecardSpec = DEFAULT_VALIDATION  # the search's fitness
    scorecard: ScorecardSpec = ScorecardSpec()  # the final table, on the test split
    baselines: tuple[str, ...] = ("multitask",)  # input models scored beside the champion, never merged
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
    def _validation_split(cls, suite: ScorecardSpec) -> ScorecardSpec:
        if suite.split != "validation":
            raise ValueError("the search scores on the validation split; test is kept for the phase's report")
        return suite

    @model_validator(mode="after")
    def _test_mirrors_validation(self) -> EvoMergeConfig:
        if self.scorecard.split != "test":
            raise ValueError("the final table is the scorecard on the test split")
        tasks = {(name, level) for name, level, _ in self.validation.tasks}
        if {(name, level) for name, level, _ in self.scorecard.tasks} != tasks or self.scorecard.text != self.validation.text:
            raise ValueError("the scorecard must measure what the validation suite does (the same tasks and "
                             "levels, text or no text); set both")
        return self


def fitness_of(metrics: dict[str, float], bpb_weight: float) -> float:
    """Mean task success minus bpb_weight bits per byte, from a card's metric values."""
    return metrics.get(MEAN_METRIC, 0.0) - bpb_weight * metrics.get(TEXT_METRIC, 0.0)


def seed_label(recipe: ParameterSpaceRecipe) -> str:
    """The technique's name, or "<specialist> alone" for a seed that keeps one specialist's task vector."""
    weights = recipe.groups[0].get("weight", [])
    if recipe.method == "task_arithmetic" and sorted(weights) == [0.0] * (len(weights) - 1) + [1.0]:
        return f"{recipe.models[weights.index(1.0)]} alone"
    return recipe.method


def champion_margins(test_fitness: dict[str, float]) -> dict[str, float]:
    """The champion's test fitness minus each rival's (every input, the uniform merge): > 0 where it wins."""
    return {name: test_fitness["champion"] - value for name, value in test_fitness.items() if name != "champion"}


def _fitness_draws(card: dict[str, Any], bpb_weight: float) -> tuple[float, Any]:
    value, draws = metric_draws(card, MEAN_METRIC)
    if TEXT_METRIC in card["metrics"]:
        bpb, bpb_draws = metric_draws(card, TEXT_METRIC)
        value, draws = value - bpb_weight * bpb, draws - bpb_weight * bpb_draws
    return value, draws


def margin_interval(champion: dict[str, Any], rival: dict[str, Any], bpb_weight: float) -> dict[str, float]:
    """The champion's fitness minus the rival's from their cards, and its paired 95% bootstrap interval: text
    blocks and each task's problems resampled, the same picks for both models."""
    value, draws = _fitness_draws(champion, bpb_weight)
    rival_value, rival_draws = _fitness_draws(rival, bpb_weight)
    low, high = percentile_interval(draws - rival_draws)
    return {"margin": value - rival_value, "ci_low": low, "ci_high": high}


def _check_parents(models: list[ForgedModel], base_name: str,
                   baseline_names: tuple[str, ...]) -> tuple[ForgedModel, list[ForgedModel], list[ForgedModel]]:
    """(the base, the specialists to merge, the baselines to score beside the champion)."""
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"input model names must be distinct, got {names}")
    if base_name not in names:
        raise ValueError(f"EvoMerge needs the specialists' base as an input model named {base_name!r}; got {names}")
    base = next(m for m in models if m.name == base_name)
    baselines = [m for m in models if m.name in baseline_names]
    specialists = [m for m in models if m.name != base_name and m.name not in baseline_names]
    if len(specialists) < 2:
        raise ValueError(f"EvoMerge needs at least two specialists beside the base, got {len(specialists)}")
    for m in specialists:
        if m.tokenizer.get_vocab() != base.tokenizer.get_vocab():
            raise ValueError(f"{m.name} has a different tokenizer from the base: merging would garble tokens")
        shapes = {n: p.shape for n, p in m.model.named_parameters()}
        if shapes != {n: p.shape for n, p in base.model.named_parameters()}:
            raise ValueError(f"{m.name} does not have the base's architecture (parameter names or shapes differ)")
    return base, specialists, baselines


class EvoMergePhase(Phase):
    name = "evomerge"
    # 4: the shared scorecard (problem-level splits, tool runtime), the multitask baseline; 5: the champion as
    # mergekit YAML; 6: DARE/DELLA masks drawn in mergekit's order (one generator), data-flow champions as slices
    version = "6"
    Config = EvoMergeConfig

    def figures(self, report: dict) -> list:
        """The training curves, and fitness by generation (figures.py)."""
        from services.evomerge.figures import fitness_figure

        return [*super().figures(report), *fitness_figure(report)]

    def transform(self, models: list[ForgedModel], config: EvoMergeConfig, progress: ProgressFn = no_progress) -> PhaseResult:
        base, specialists, baselines = _check_parents(models, config.base_name, config.baselines)
        names = [m.name for m in specialists]
        parents = [base, *specialists]
        started = time.perf_counter()

        def validation_score(forged: ForgedModel) -> tuple[float, dict[str, Any]]:
            metrics = values(score(forged.model, forged.tokenizer, config.validation))
            return fitness_of(metrics, config.bpb_weight), metrics

        evaluator, log = Evaluator(parents, validation_score, config.workers), SearchLog()
        progress(0.0, "scoring the parents and the seed techniques on the validation split")
        parent_scores = {m.name: validation_score(m) for m in parents}
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
        merged = apply_recipe(champion.recipe, parents, name="evomerge")
        uniform = apply_recipe(
            ParameterSpaceRecipe(method="linear", models=tuple(names), groups=({"weight": [1.0] * len(names)},)),
            parents, name="uniform-linear",
        )
        cards = {}
        table = [merged, *parents, *baselines, uniform]
        for i, m in enumerate(table):
            name = "champion" if m is merged else m.name
            cards[name] = score(m.model, m.tokenizer, config.scorecard,
                                lambda f, msg, i=i: progress(0.8 + 0.2 * (i + f) / len(table), f"test scorecard {msg}"))
        test_fitness = {name: fitness_of(values(card), config.bpb_weight) for name, card in cards.items()}
        margins = champion_margins(test_fitness)
        intervals = {name: margin_interval(cards["champion"], cards[name], config.bpb_weight) for name in margins}
        comparisons = {name: compare(cards["champion"], cards[name]) for name in margins}
        # "Every parent and the uniform merge": the baselines (multitask) are judged on their own, in the summary.
        merge_rivals = [m.name for m in parents] + [uniform.name]
        beats_all = all(margins[name] > 0 for name in merge_rivals)
        beats_all_significantly = all(intervals[name]["ci_low"] > 0 for name in merge_rivals)
        progress(1.0, f"champion: {champion.stage} fitness {champion.fitness:.4f}")

        report = {
            "fitness": f"{MEAN_METRIC} - {config.bpb_weight} * {TEXT_METRIC}",
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
                "mergekit": dict(zip(("config", "note"), champion_as_mergekit(
                    champion.recipe, parents[0].model.config.num_hidden_layers))),
            },
            "lineage": {
                "parents": [m.name for m in parents],
                "seed": seed_label(best_seed.recipe),
                "parameter_space_champion": {"generation": ps_champion.generation, "stage": ps_champion.stage,
                                             "validation_fitness": ps_champion.fitness},
                "final_stage": champion.stage,
            },
            "scorecard": report_section(config.scorecard, cards, inputs=[m.name for m in [*parents, *baselines]],
                                        outputs=["champion"], baselines=[*(m.name for m in baselines), uniform.name]),
            "test_fitness": test_fitness,
            "champion_margin_on_test": margins,
            "champion_beats_every_parent_and_uniform_on_test": beats_all,
            "champion_margin_on_test_95pct": intervals,
            "champion_beats_every_parent_and_uniform_with_95pct_significance": beats_all_significantly,
            # The parents alone: the uniform merge is one of the search's seeds, so beating it measures the search.
            "champion_beats_every_parent_with_95pct_significance": all(
                intervals[m.name]["ci_low"] > 0 for m in parents),
            "comparisons": comparisons,
            "baselines_missing": [name for name in config.baselines if name not in {m.name for m in baselines}],
            "evaluations": len(evaluator.cache),
            "search_seconds": search_seconds,
            "workers": config.workers,
        }
        report["champion_beats_baseline_with_95pct_significance"] = {
            m.name: intervals[m.name]["ci_low"] > 0 for m in baselines}
        report["summary"] = _summary(report, champion, [m.name for m in baselines])
        return PhaseResult(models=[merged], report=report)


def _summary(report: dict[str, Any], champion, baselines: list[str]) -> dict[str, Any]:
    intervals = report["champion_margin_on_test_95pct"]
    merge_rivals = [name for name in intervals if name not in baselines]
    summary = {
        "champion": f"{champion.stage} {getattr(champion.recipe, 'method', 'layer path')}",
        "champion.test_fitness": round(report["test_fitness"]["champion"], 4),
        "smallest_margin_on_test": round(min(report["champion_margin_on_test"][n] for n in merge_rivals), 4),
        "champion_beats_every_parent_and_uniform_on_test": report["champion_beats_every_parent_and_uniform_on_test"],
        "smallest_margin_95pct_low": round(min(intervals[n]["ci_low"] for n in merge_rivals), 4),
        "champion_beats_all_with_95pct_significance":
            report["champion_beats_every_parent_and_uniform_with_95pct_significance"],
        "champion_beats_every_parent_with_95pct_significance":
            report["champion_beats_every_parent_with_95pct_significance"],
    }
    for name in baselines:
        interval = intervals[name]
        summary[f"margin_over_{name}"] = round(interval["margin"], 4)
        summary[f"margin_over_{name}_95pct_low"] = round(interval["ci_low"], 4)
        summary[f"champion_beats_{name}_with_95pct_significance"] = interval["ci_low"] > 0
        summary[f"pareto_relation_to_{name}"] = report["comparisons"][name]["relation"]
    return summary
