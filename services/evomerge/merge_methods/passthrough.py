"""Passthrough and frankenmerges: new models stacked from layer slices of other models (mergekit "passthrough").

A tensor is either inside a decoder layer ("model.layers.<i>.…") or outside all layers (embeddings, final
norm, LM head). A stacked model takes its layers, renumbered 0..n-1, from a path of (model, layer) steps;
the embeddings come from the model of the first step and the final norm and head from the model of the last.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from services.evomerge.merge_methods.base import MergeConfigError, MergeMethod, ParameterSpec, StateDict

LAYER_NAME = re.compile(r"^(?P<prefix>.*?\blayers\.)(?P<index>\d+)(?P<rest>\..*)$")


def layer_index(tensor_name: str) -> int | None:
    match = LAYER_NAME.match(tensor_name)
    return int(match["index"]) if match else None


def num_layers(state: StateDict) -> int:
    indices = {layer_index(name) for name in state} - {None}
    return max(indices) + 1 if indices else 0


def layers_of(state: StateDict) -> dict[int, dict[str, str]]:
    """layer index -> {what follows the index in a tensor's name (".mlp.up_proj.weight"): the full name}."""
    layers: dict[int, dict[str, str]] = {}
    for name in state:
        if match := LAYER_NAME.match(name):
            layers.setdefault(int(match["index"]), {})[match["rest"]] = name
    return layers


def renumbered(name: str, index: int) -> str:
    """A layer tensor's name as it is in layer `index` ("model.layers.3.x", 0 -> "model.layers.0.x")."""
    match = LAYER_NAME.match(name)
    return f"{match['prefix']}{index}{match['rest']}"


def is_embedding(name: str) -> bool:
    """Outside the layers, the embeddings come before them; everything else (final norm, head) after."""
    return "embed" in name


class PassthroughMerge(MergeMethod):
    """One input, copied (optionally scaled); the per-tensor step of a frankenmerge. The scale belongs to the
    input, as in mergekit, so a YAML source's own `scale` applies to its tensors."""

    name = "passthrough"
    parameters = (ParameterSpec("scale", default=1.0, per_model=True),)
    max_models = 1

    def merge(self, tensors, base, generator, *, scale):
        return tensors[0] if scale[0] == 1.0 else tensors[0] * scale[0]


@dataclass(frozen=True)
class LayerSlice:
    model: int  # index into the list of input models
    start: int  # first layer, inclusive
    end: int  # last layer, exclusive


def stack_layers(
    models: list[StateDict], path: list[tuple[int, int]], layer_scales: dict[str, list[float]] | None = None
) -> StateDict:
    """Build a state dict whose layer k is layer path[k][1] of model path[k][0].

    layer_scales maps a tensor-name suffix (e.g. "self_attn.o_proj.weight") to one factor per path step;
    data-flow merging uses it to fold its crossing scales into the weights.
    """
    if not path:
        raise MergeConfigError("a stacked model needs at least one layer")
    for model, layer in path:
        if not 0 <= model < len(models):
            raise MergeConfigError(f"path names model {model}, but there are {len(models)} models")
        if not 0 <= layer < num_layers(models[model]):
            raise MergeConfigError(f"path names layer {layer} of model {model}, which has {num_layers(models[model])}")
    layer_scales = layer_scales or {}
    layers = [layers_of(state) for state in models]
    first, last = path[0][0], path[-1][0]
    # Embeddings from the first step's model; final norm and head from the last step's.
    stacked = {
        name: (models[first] if is_embedding(name) else models[last])[name]
        for name in models[first]
        if layer_index(name) is None
    }
    for k, (m, layer) in enumerate(path):
        for rest, name in layers[m][layer].items():
            factor = next((f[k] for suffix, f in layer_scales.items() if rest.endswith(suffix)), 1.0)
            tensor = models[m][name]
            stacked[renumbered(name, k)] = tensor if factor == 1.0 else tensor * factor
    return stacked


def frankenmerge(models: list[StateDict], slices: list[LayerSlice]) -> StateDict:
    path = [(s.model, layer) for s in slices for layer in range(s.start, s.end)]
    return stack_layers(models, path)
