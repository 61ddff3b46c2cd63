"""Passthrough and frankenmerges: new models stacked from layer slices of other models (mergekit "passthrough").

A tensor is either inside a decoder layer ("model.layers.<i>.…") or outside all layers (embeddings, final
norm, LM head). A stacked model takes its layers, renumbered 0..n-1, from a path of (model, layer) steps;
the embeddings come from the model of the first step and the final norm and head from the model of the last.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from services.evomerge.merge_methods.base import MergeConfigError, MergeMethod, ParameterSpec, StateDict

LAYER_NAME = re.compile(r"^(?P<prefix>.*?\blayers\.)(?P<index>\d+)(?P<rest>\..*)$")


def layer_index(tensor_name: str) -> int | None:
    match = LAYER_NAME.match(tensor_name)
    return int(match["index"]) if match else None


def num_layers(state: StateDict) -> int:
    indices = {layer_index(name) for name in state} - {None}
    return max(indices) + 1 if indices else 0


class PassthroughMerge(MergeMethod):
    """One input, copied (optionally scaled); the per-tensor step of a frankenmerge."""

    name = "passthrough"
    parameters = (ParameterSpec("scale", default=1.0),)
    max_models = 1

    def merge(self, tensors, base, generator, *, scale):
        return tensors[0] if scale == 1.0 else tensors[0] * scale


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
    by_layer: dict[tuple[int, int], dict[str, tuple[str, torch.Tensor]]] = {}
    for m, state in enumerate(models):
        for name, tensor in state.items():
            match = LAYER_NAME.match(name)
            if match:
                by_layer.setdefault((m, int(match["index"])), {})[match["rest"]] = (match["prefix"], tensor)
    first, last = path[0][0], path[-1][0]
    # Embeddings from the first step's model; final norm and head from the last step's.
    stacked = {
        name: (models[first] if _is_embedding(name) else models[last])[name]
        for name in models[first]
        if layer_index(name) is None
    }
    for k, (m, layer) in enumerate(path):
        for rest, (prefix, tensor) in by_layer[(m, layer)].items():
            factor = next((f[k] for suffix, f in layer_scales.items() if rest.endswith(suffix)), 1.0)
            stacked[f"{prefix}{k}{rest}"] = tensor if factor == 1.0 else tensor * factor
    return stacked


def _is_embedding(name: str) -> bool:
    return "embed" in name


def frankenmerge(models: list[StateDict], slices: list[LayerSlice]) -> StateDict:
    path = [(s.model, layer) for s in slices for layer in range(s.start, s.end)]
    return stack_layers(models, path)
