"""The small interface every merge method implements, and the walk that applies one to whole state dicts.

A method declares its parameters as data and merges one tensor at a time; it never reads raw config.
Parameters are either shared by the whole merge (slerp's t, task arithmetic's lambda) or given per input
model (weight, density), in the order of the input models. The state-dict walk asks a callback for the
parameters of each tensor, so evolution can give every layer group its own values.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

StateDict = dict[str, torch.Tensor]
_MISSING = object()


class MergeConfigError(ValueError):
    """A merge was asked for with parameters or inputs the method cannot use."""


@dataclass(frozen=True)
class ParameterSpec:
    name: str
    default: Any = _MISSING  # no default: the parameter is required
    per_model: bool = False  # one value per input model, else one value for the whole merge

    @property
    def required(self) -> bool:
        return self.default is _MISSING


class MergeMethod(ABC):
    name: ClassVar[str] | str
    parameters: tuple[ParameterSpec, ...] = ()
    needs_base: bool = False
    min_models: int = 1
    max_models: int | None = None

    def resolve(self, params: dict[str, Any], n_models: int) -> dict[str, Any]:
        """Fill defaults, reject unknown or missing names, expand per-model scalars to lists."""
        known = {spec.name: spec for spec in self.parameters}
        unknown = set(params) - set(known)
        if unknown:
            raise MergeConfigError(f"{self.name}: unknown parameters {sorted(unknown)}; it takes {sorted(known)}")
        resolved = {}
        for spec in self.parameters:
            value = params.get(spec.name, spec.default)
            if value is _MISSING:
                raise MergeConfigError(f"{self.name}: parameter {spec.name!r} is required")
            if spec.per_model:
                value = list(value) if isinstance(value, (list, tuple)) else [value] * n_models
                if len(value) != n_models:
                    raise MergeConfigError(f"{self.name}: {spec.name} has {len(value)} values for {n_models} models")
            resolved[spec.name] = value
        return resolved

    def check_inputs(self, n_models: int, has_base: bool) -> None:
        if self.needs_base and not has_base:
            raise MergeConfigError(f"{self.name} works on task vectors and needs an explicit base model")
        if n_models < self.min_models or (self.max_models is not None and n_models > self.max_models):
            most = self.max_models if self.max_models is not None else "any number of"
            raise MergeConfigError(f"{self.name} takes {self.min_models} to {most} models, got {n_models}")

    @abstractmethod
    def merge(
        self, tensors: list[torch.Tensor], base: torch.Tensor | None, generator: torch.Generator, **params: Any
    ) -> torch.Tensor:
        """Merge one tensor. `generator` is the only source of randomness (DARE/DELLA masks)."""


def work_dtype(tensor: torch.Tensor) -> torch.dtype:
    """What a merge computes in: float64 for float64 inputs, else float32 (half-precision inputs lose too
    much in sums, and torch.bernoulli has no float16 CPU kernel: masks drawn in float32 agree with mergekit's)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def merge_state_dicts(
    method: MergeMethod,
    models: list[StateDict],
    base: StateDict | None,
    params_for: Callable[[str], dict[str, Any]],
    *,
    seed: int = 0,
) -> StateDict:
    """Merge every tensor of `models` (same names and shapes) with `method`; the result in the first model's key order.

    Random masks come from one generator seeded with `seed`, tensor after tensor in the sorted order of their
    names: mergekit 0.1.5's order for models merged whole, so mergekit with --random-seed `seed` draws the same.
    A mask takes one draw per entry whatever its density, so merges that differ only in densities share their
    draws (nested masks), until a tensor draws nothing (density 1, or DELLA's 0, as in mergekit): that shifts
    the draws of every tensor after it.
    """
    method.check_inputs(len(models), base is not None)
    names = list(models[0])
    for index, state in enumerate(models[1:] + ([base] if base is not None else []), start=1):
        if set(state) != set(names):
            raise MergeConfigError(f"model {index} has different tensor names: {sorted(set(state) ^ set(names))[:5]}")
    generator = torch.Generator().manual_seed(seed)
    merged = {
        name: merge_tensor(method, name, [state[name] for state in models], base[name] if base is not None else None,
                           params_for(name), generator)
        for name in sorted(names)
    }
    return {name: merged[name] for name in names}


def merge_tensor(
    method: MergeMethod,
    name: str,
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    params: dict[str, Any],
    generator: torch.Generator,
) -> torch.Tensor:
    """One output tensor `name` from the inputs' tensors (same shapes), in the first input's dtype."""
    if any(t.shape != tensors[0].shape for t in tensors + ([base] if base is not None else [])):
        shapes = [tuple(t.shape) for t in tensors] + ([f"base {tuple(base.shape)}"] if base is not None else [])
        raise MergeConfigError(f"{name}: shapes differ {shapes}")
    with torch.no_grad():
        return method.merge(tensors, base, generator, **method.resolve(params, len(tensors))).to(tensors[0].dtype)
