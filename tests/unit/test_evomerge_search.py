"""The evolutionary search on tiny models with a cheap, real fitness: how close a merge's logits come to a
target model's. The target is a known merge, so the search has a right answer to find."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from services.evomerge.recipe import DataFlowRecipe, ParameterSpaceRecipe, apply_recipe, parse_recipe, weights_of
from services.evomerge.search import (
    Evaluator,
    SearchLog,
    StageBudget,
    cma_stage,
    data_flow_search,
    decode,
    encode,
    parameter_space_search,
    seed_recipes,
)
from shared.checkpoint import save_checkpoint
from shared.phase import ForgedModel
from tests.unit.test_merge_methods import tiny_family

pytestmark = pytest.mark.unit

TOKENS = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
NAMES = ["spec-a", "spec-b", "spec-c"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(128)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), eos_token="t1")


@pytest.fixture(scope="module")
def parents() -> list[ForgedModel]:
    base, finetunes = tiny_family(3)
    tokenizer = tiny_tokenizer()
    return [ForgedModel(base, tokenizer, "base")] + [ForgedModel(m, tokenizer, n) for m, n in zip(finetunes, NAMES)]


def logits_of(forged: ForgedModel) -> torch.Tensor:
    with torch.no_grad():
        return forged.model(TOKENS).logits


def closeness_to(target: torch.Tensor):
    def score(forged: ForgedModel):
        error = (logits_of(forged) - target).pow(2).mean().item()
        return -error, {"mse": error}

    return score


def ties_recipe(weights, densities=(1.0, 1.0, 1.0)) -> ParameterSpaceRecipe:
    return ParameterSpaceRecipe(method="task_arithmetic", models=tuple(NAMES), base="base",
                                groups=({"weight": list(weights)}, {"weight": list(weights)}))


def test_seed_recipes_cover_the_techniques_that_fit():
    recipes = seed_recipes(["linear", "slerp", "ties", "model_stock"], NAMES, "base", layer_groups=2, seed=0,
                           specialists_alone=False)
    assert [r.method for r in recipes] == ["linear", "ties", "model_stock"]  # slerp blends two models only
    ties = recipes[1]
    assert ties.base == "base" and len(ties.groups) == 2 and ties.groups[0]["density"] == [0.5] * 3
    assert recipes[0].base is None
    alone = seed_recipes(["linear"], NAMES, "base", layer_groups=2, seed=0)[1:]
    assert [r.groups for r in alone] == [({"weight": w}, {"weight": w}) for w in ([1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0])]
    assert decode(alone[1], encode(alone[1])) == alone[1]  # a specialist alone is a point of the genome


def test_genome_round_trip():
    recipe = seed_recipes(["della"], NAMES, "base", layer_groups=3, seed=0)[0]
    x = encode(recipe)
    assert x.shape == (3 * 2 * 3,)  # groups x (weight, density) x models
    assert decode(recipe, x) == recipe
    moved = decode(recipe, np.full_like(x, 2.0))  # out of bounds is clipped, DELLA's density kept below 1 - eps
    assert max(moved.groups[0]["density"]) <= 1 - 0.15


@pytest.mark.slow
def test_parameter_space_search_finds_the_weights_of_a_known_merge(parents):
    target = logits_of(apply_recipe(ties_recipe([0.7, 0.1, 0.2]), parents))
    evaluator, log = Evaluator(parents, closeness_to(target)), SearchLog()
    start = ties_recipe([1 / 3] * 3)
    start_fitness = evaluator([start], "seed", 0, log)[0].fitness
    parameter_space_search(start, evaluator, log, StageBudget(generations=25, population=8, patience=25, min_improvement=0), 0,
                           lambda f, m: None)
    champion = log.champion
    assert champion.fitness > start_fitness / 20  # the error shrank more than twentyfold
    found = champion.recipe.groups[0]["weight"]
    assert np.allclose(found, [0.7, 0.1, 0.2], atol=0.08), found
    # Where a merge is the right answer, the champion beats every parent and the uniform merge on the score.
    score = closeness_to(target)
    uniform = ParameterSpaceRecipe(method="linear", models=tuple(NAMES), groups=({"weight": [1.0] * 3},))
    rivals = [*parents, apply_recipe(uniform, parents)]
    assert all(champion.fitness > score(rival)[0] for rival in rivals)
    generations = [g for g in log.generations if g["stage"] == "parameter_space"]
    assert len(generations) == 25 and all(g["best"] is not None for g in generations)


def test_stage_stops_on_a_plateau(parents):
    target = logits_of(apply_recipe(ties_recipe([0.7, 0.1, 0.2]), parents))
    evaluator, log = Evaluator(parents, closeness_to(target)), SearchLog()
    start = ties_recipe([1 / 3] * 3)
    # Fitness moves (so CMA-ES itself does not stop) but never by the 1.0 asked for.
    cma_stage("parameter_space", encode(start), lambda x: decode(start, x), evaluator, log,
              StageBudget(generations=20, population=4, patience=3, min_improvement=1.0), 0)
    assert len(log.generations) == 4  # one to set the best, then three without improvement


def test_data_flow_search_starts_from_the_merge_and_keeps_paths_feasible(parents):
    ps = ties_recipe([0.5, 0.3, 0.2])
    target = logits_of(apply_recipe(ps, parents))
    evaluator, log = Evaluator(parents, closeness_to(target)), SearchLog()
    data_flow_search(ps, "spec-a", [2, 2], repeats=2, max_layers=3, evaluate=evaluator, log=log,
                     budget=StageBudget(generations=3, population=6, patience=3, min_improvement=0), seed=0,
                     progress=lambda f, m: None)
    assert log.evaluated and all(isinstance(e.recipe, DataFlowRecipe) for e in log.evaluated)
    assert all(0 < len(e.recipe.steps) <= 3 for e in log.evaluated)
    # The merge's own path (model 0, layers 0 and 1, no crossing) reproduces it exactly.
    own = DataFlowRecipe(models=(ps, "spec-a"), steps=((0, 0), (0, 1)))
    assert torch.equal(logits_of(apply_recipe(own, parents)), target)


def test_recipe_json_reapplies_to_the_same_digest(parents, tmp_path):
    recipe = DataFlowRecipe(
        models=(ParameterSpaceRecipe(method="dare_ties", models=tuple(NAMES), base="base",
                                     groups=({"weight": [0.4, 0.3, 0.3], "density": [0.5, 0.4, 0.6]},), seed=5),
                "spec-b"),
        steps=((0, 0), (1, 1), (0, 1)), crossing_scales={"0->1": 0.8, "1->0": 1.2},
    )
    text = json.dumps(recipe.model_dump(mode="json"))
    again = parse_recipe(json.loads(text))
    assert again == recipe
    digests = []
    for i, r in enumerate([recipe, again]):
        merged = apply_recipe(r, parents, name="champion")
        manifest = save_checkpoint(merged, tmp_path / str(i), phase="evomerge", code_version="1", config={},
                                   config_hash="", parents=[])
        digests.append(manifest.digest)
    assert digests[0] == digests[1]
    other = apply_recipe(recipe.model_copy(update={"crossing_scales": {"0->1": 0.9, "1->0": 1.2}}), parents)
    assert not all(torch.equal(a, b) for a, b in zip(weights_of(other.model).values(),
                                                       weights_of(apply_recipe(recipe, parents).model).values()))


def test_recipes_with_wrong_parameters_or_parents_fail_clearly(parents):
    with pytest.raises(ValueError, match="unknown parameters"):
        ParameterSpaceRecipe(method="ties", models=tuple(NAMES), base="base", groups=({"weight": 1.0, "dens": 1},))
    with pytest.raises(ValueError, match="needs an explicit base"):
        ParameterSpaceRecipe(method="ties", models=tuple(NAMES), groups=({"weight": 1.0},))
    with pytest.raises(ValueError, match="parent 'spec-z'"):
        apply_recipe(ParameterSpaceRecipe(method="linear", models=("spec-a", "spec-z")), parents)
