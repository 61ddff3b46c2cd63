"""EvoMerge's champion as mergekit YAML, beside our own recipe, and a note: how mergekit reproduces it, or
why it cannot. Models are named by parent name: put their folders there.

- A parameter-space champion is one mergekit config over its parents; each layer group's values become
  per-tensor filters. DARE and DELLA draw their masks as mergekit does (merge_state_dicts: one generator,
  tensors in name order), so mergekit run with `--random-seed` the recipe's seed draws the same masks. Our
  papers' 1/p rescale is, for DARE without normalization, mergekit's no-rescale with each weight divided by
  its density; DELLA's 1/p differs per entry and has no mergekit form.
- A data-flow champion is a passthrough over `slices`, one slice per run of consecutive layers of one
  model; its crossing scales, which dfs.py folds into the layers' residual writes, become each slice's
  passthrough `scale` on those tensors. A merged stage among its models (PS+DFS) is a named document before
  it: together a mergekit-multi file.
"""
from __future__ import annotations

from typing import Any

from services.evomerge.merge_methods import get_method
from services.evomerge.merge_methods.dfs import RESIDUAL_WRITERS, DataFlowPath
from services.evomerge.mergekit_yaml import RANDOM_METHODS
from services.evomerge.recipe import DataFlowRecipe, ParameterSpaceRecipe, group_of

# What a passthrough `scale` filter matches in the tensors a crossing scale is folded into.
RESIDUAL_WRITER_FILTERS = tuple(sorted({name.rsplit(".", 1)[0] for name in RESIDUAL_WRITERS}))
TESTED = "tested against mergekit 0.1.5 within 1e-6"

Exported = tuple[dict | list[dict] | None, str]


def champion_as_mergekit(recipe: ParameterSpaceRecipe | DataFlowRecipe, n_layers: int) -> Exported:
    """The champion as a mergekit config (a data-flow one over a merged stage: the documents of a
    mergekit-multi file), or None; and a note saying how to reproduce it, or why mergekit cannot."""
    if isinstance(recipe, DataFlowRecipe):
        return _data_flow(recipe, n_layers)
    return _parameter_space(recipe, n_layers)


def _tensor_filters(n_layers: int, n_groups: int) -> list[tuple[str, int]]:
    """(filter, layer group) covering every tensor the way recipe.group_of assigns them: each layer by its
    index (the trailing dot keeps layers.1. from matching layers.10.), embeddings with the first group,
    the final norm and the head with the last."""
    by_layer = [(f"layers.{i}.", group_of(f"model.layers.{i}.x", n_layers, n_groups)) for i in range(n_layers)]
    return [*by_layer, ("embed_tokens", 0), ("model.norm.", n_groups - 1), ("lm_head", n_groups - 1)]


def _per_tensor(values: list[Any], filters: list[tuple[str, int]]) -> Any:
    """A value per layer group as mergekit filters; a plain value where every group has the same."""
    if all(value == values[0] for value in values):
        return values[0]
    return [{"filter": name, "value": values[group]} for name, group in filters]


def _paper_rescale_as_weights(recipe: ParameterSpaceRecipe, group: dict[str, Any]) -> dict[str, Any] | str:
    """A DARE group with the 1/p rescale as mergekit's no-rescale with weight / density (survivors times
    w / p either way), or why it has no such form."""
    if group.get("rescale", "paper") != "paper":
        return group
    resolved = get_method(recipe.method).resolve(group, len(recipe.models))
    if not recipe.method.startswith("dare"):
        return f"{recipe.method} with our papers' 1/p rescale: its keep probability, hence 1/p, differs per entry"
    if resolved["normalize"]:
        return f"{recipe.method} normalizing with the 1/p rescale: it divides by the weights before 1/p"
    if min(resolved["density"]) <= 0:
        return f"{recipe.method} with a density of 0 and the 1/p rescale"
    weights = [w / d if d < 1 else w for w, d in zip(resolved["weight"], resolved["density"])]
    return {**group, "weight": weights, "rescale": "none"}


def _parameter_space(recipe: ParameterSpaceRecipe, n_layers: int, whose: str = "the champion's") -> Exported:
    filters = _tensor_filters(n_layers, len(recipe.groups))
    groups = [{**recipe.shared, **group} for group in recipe.groups]
    method = get_method(recipe.method)
    per_model = {spec.name for spec in method.parameters if spec.per_model}
    paper = recipe.method in RANDOM_METHODS and any(group.get("rescale", "paper") == "paper" for group in groups)
    if paper:
        rewritten = [_paper_rescale_as_weights(recipe, group) for group in groups]
        if reasons := [r for r in rewritten if isinstance(r, str)]:
            return None, f"{reasons[0]}; mergekit rescales by the L1 norm or not at all"
        groups = rewritten
    if recipe.method in RANDOM_METHODS:  # mergekit's rescale is a flag: its L1 norm, or none
        groups = [{**group, "rescale": group["rescale"] == "l1"} for group in groups]
    models = []
    for index, name in enumerate(recipe.models):
        parameters = {key: _per_tensor([g[key][index] if isinstance(g[key], list) else g[key] for g in groups], filters)
                      for key in sorted(per_model) if key in groups[0]}
        models.append({"model": name, "parameters": parameters} if parameters else {"model": name})
    shared = {key: _per_tensor([g[key] for g in groups], filters) for key in sorted(groups[0]) if key not in per_model}
    config = {"merge_method": recipe.method, "models": models, "dtype": "float32"}
    if recipe.method == "slerp":
        config["base_model"] = recipe.models[0]
    elif recipe.base is not None:
        config["base_model"] = recipe.base
    if shared:
        config["parameters"] = shared
    if recipe.method not in RANDOM_METHODS:
        return config, f"reproduces {whose} weights ({TESTED})"
    how = " (our 1/p rescale as rescale: false, each weight divided by its density)" if paper else ""
    return config, (f"reproduces {whose} weights run by mergekit with --random-seed {recipe.seed}, which "
                    f"draws the same masks{how} ({TESTED})")


def _data_flow(recipe: DataFlowRecipe, n_layers: int) -> Exported:
    stages, names, notes = [], [], []
    for index, model in enumerate(recipe.models):
        if isinstance(model, str):
            names.append(model)
            continue
        name = f"stage-{index}"
        stage, note = _parameter_space(model, n_layers, whose=f"{name}'s")
        if stage is None:
            return None, f"its merged stage (model {index} of the path) has no mergekit form: {note}"
        names.append(name)
        stages.append({"name": name, **stage})
        notes.append(f"{name}: {note}")
    slices: list[dict] = []
    previous = None  # (model, next layer, factor) of the slice being extended
    factors = DataFlowPath(recipe.steps, recipe.crossing_scales).residual_factors()
    for (model, layer), factor in zip(recipe.steps, factors):
        if previous == (model, layer, factor):
            slices[-1]["sources"][0]["layer_range"][1] += 1
        else:
            source: dict[str, Any] = {"model": names[model], "layer_range": [layer, layer + 1]}
            if factor != 1.0:
                source["parameters"] = {"scale": [{"filter": f, "value": factor} for f in RESIDUAL_WRITER_FILTERS]}
            slices.append({"sources": [source]})
        previous = (model, layer + 1, factor)
    path = {"merge_method": "passthrough", "dtype": "float32", "slices": slices}
    how = "its layer path as slices" + (", its crossing scales as passthrough scale on the residual writes"
                                        if any(factor != 1.0 for factor in factors) else "")
    if not stages:
        return path, f"reproduces the champion's weights: {how} ({TESTED})"
    return [*stages, path], (f"a mergekit-multi file (mergekit-multi FILE --out-path OUT -I STAGES_DIR) that "
                             f"reproduces the champion's weights: its merged stage first, then {how}; "
                             + "; ".join(notes))
