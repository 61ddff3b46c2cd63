"""A merge recipe: everything needed to rebuild a merged model from its parents, as JSON.

Two kinds, which nest (PS+DFS: a data-flow recipe may stack a parameter-space merge with parents):
- ParameterSpaceRecipe: one registered merge method over named parents, its parameters given per layer
  group (group g holds layers [g*L/G, (g+1)*L/G); embeddings go with the first group, the final norm and
  head with the last), plus parameters shared by every group, plus the seed of any random masks.
- DataFlowRecipe: a path of (model, layer) steps through the listed models and the crossing scales.

apply_recipe(recipe, parents) is deterministic: the same recipe and parents give bit-identical weights,
hence the same checkpoint digest.
"""
from __future__ import annotations

import copy
from typing import Annotated, Any, Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import AutoModelForCausalLM

from services.evomerge.merge_methods import get_method, merge_state_dicts
from services.evomerge.merge_methods.base import MergeConfigError, StateDict
from services.evomerge.merge_methods.dfs import DataFlowPath, dfs_merge
from services.evomerge.merge_methods.passthrough import layer_index
from shared.phase import ForgedModel


class ParameterSpaceRecipe(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["parameter_space"] = "parameter_space"
    method: str
    models: tuple[str, ...]  # parent names, in the order per-model parameters list them
    base: str | None = None  # parent name of the base, for methods working on task vectors
    shared: dict[str, Any] = Field(default_factory=dict)
    groups: tuple[dict[str, Any], ...] = ({},)  # per layer group, e.g. {"weight": [...], "density": [...]}
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> ParameterSpaceRecipe:
        method = get_method(self.method)
        method.check_inputs(len(self.models), self.base is not None)
        for group in self.groups:
            method.resolve({**self.shared, **group}, len(self.models))  # raises on unknown/missing/wrong length
        return self


class DataFlowRecipe(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["data_flow"] = "data_flow"
    models: tuple[Union[str, ParameterSpaceRecipe], ...]  # parent names or merges to build first
    steps: tuple[tuple[int, int], ...]
    crossing_scales: dict[str, float] = Field(default_factory=dict)


Recipe = Annotated[Union[ParameterSpaceRecipe, DataFlowRecipe], Field(discriminator="kind")]


class _RecipeDocument(BaseModel):
    recipe: Recipe


def parse_recipe(raw: dict[str, Any]) -> ParameterSpaceRecipe | DataFlowRecipe:
    return _RecipeDocument.model_validate({"recipe": raw}).recipe


# --- weights in and out of models ---------------------------------------------------------------------


def weights_of(model) -> StateDict:
    """Distinct parameters by name: a tied output embedding appears once, as the input embedding."""
    return {name: p.detach() for name, p in model.named_parameters()}


def load_weights(model, weights: StateDict) -> None:
    """Load exactly the model's distinct parameters (tied ones follow their owner)."""
    expected = set(weights_of(model))
    if set(weights) != expected:
        raise MergeConfigError(
            f"merged weights do not fit the model: missing {sorted(expected - set(weights))[:5]}, "
            f"unexpected {sorted(set(weights) - expected)[:5]}"
        )
    model.load_state_dict(weights, strict=False)


def group_of(tensor_name: str, n_layers: int, n_groups: int) -> int:
    layer = layer_index(tensor_name)
    if layer is None:
        return 0 if "embed" in tensor_name else n_groups - 1
    return layer * n_groups // n_layers


# --- applying ------------------------------------------------------------------------------------------


def apply_recipe(recipe: ParameterSpaceRecipe | DataFlowRecipe | dict, parents: list[ForgedModel], name: str = "merged") -> ForgedModel:
    """Build the merged model the recipe describes from `parents` (matched by name)."""
    if isinstance(recipe, dict):
        recipe = parse_recipe(recipe)
    by_name = {parent.name: parent for parent in parents}
    if isinstance(recipe, ParameterSpaceRecipe):
        return _apply_parameter_space(recipe, by_name, name)
    return _apply_data_flow(recipe, by_name, name)


def _parent(by_name: dict[str, ForgedModel], name: str) -> ForgedModel:
    if name not in by_name:
        raise MergeConfigError(f"the recipe names parent {name!r}; given parents: {sorted(by_name)}")
    return by_name[name]


def _apply_parameter_space(recipe: ParameterSpaceRecipe, by_name: dict[str, ForgedModel], name: str) -> ForgedModel:
    models = [_parent(by_name, n) for n in recipe.models]
    template = models[0].model
    n_layers, n_groups = template.config.num_hidden_layers, len(recipe.groups)
    params = [{**recipe.shared, **group} for group in recipe.groups]
    merged = merge_state_dicts(
        get_method(recipe.method),
        [weights_of(m.model) for m in models],
        weights_of(_parent(by_name, recipe.base).model) if recipe.base is not None else None,
        lambda tensor: params[group_of(tensor, n_layers, n_groups)],
        seed=recipe.seed,
    )
    model = copy.deepcopy(template)
    load_weights(model, merged)
    return ForgedModel(model=model.eval(), tokenizer=models[0].tokenizer, name=name)


def _apply_data_flow(recipe: DataFlowRecipe, by_name: dict[str, ForgedModel], name: str) -> ForgedModel:
    models = [
        _parent(by_name, m) if isinstance(m, str) else _apply_parameter_space(m, by_name, "stage")
        for m in recipe.models
    ]
    vocabularies = {len(m.tokenizer) for m in models}
    if len(vocabularies) != 1:
        raise MergeConfigError(f"data-flow merging needs one tokenizer; vocabulary sizes {sorted(vocabularies)}")
    stacked = dfs_merge([weights_of(m.model) for m in models], DataFlowPath(recipe.steps, recipe.crossing_scales))
    model = stacked_model_shell(models[0].model.config, [layer for _, layer in recipe.steps])
    load_weights(model, stacked)
    return ForgedModel(model=model.eval(), tokenizer=models[0].tokenizer, name=name)


def stacked_model_shell(config, source_layers: list[int]):
    """An untrained model like `config`'s whose layer k will hold layer source_layers[k] of such a model."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = len(source_layers)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[layer] for layer in source_layers]
    with torch.random.fork_rng(devices=[]):  # initialising the shell must not move anyone's RNG
        return AutoModelForCausalLM.from_config(config)
