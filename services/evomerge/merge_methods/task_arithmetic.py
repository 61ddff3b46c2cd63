"""Generalized task arithmetic: task arithmetic, TIES, DARE, DELLA and Model Breadcrumbs as configured
instances of one method.

On task vectors delta_i = theta_i - base (never on raw weights):
  1. sparsify each delta (none, magnitude, random drop, della magprune, magnitude outliers)  -- sparsify.py
  2. weight it: w_i * delta_i
  3. optionally elect a sign per entry (TIES "sum": sign of sum_i w_i delta_i) and keep only the entries
     that agree with it
  4. sum; when normalizing divide by the summed weights of the contributing (agreeing) models
  5. result = base + lambda * mixed delta
As in mergekit's generalized_task_arithmetic, the same code with different settings gives every variant.
"""
from __future__ import annotations

from typing import Literal

import torch

from services.evomerge.merge_methods.base import MergeMethod, ParameterSpec, work_dtype
from services.evomerge.merge_methods.sparsify import della_magprune, magnitude, magnitude_outliers, random_drop

Sparsification = Literal["magnitude", "random", "della", "outliers"]


def elect_sign_mask(weighted_deltas: torch.Tensor) -> torch.Tensor:
    """[models, ...] -> bool mask of entries whose sign agrees with the sign of the sum (ties go to +)."""
    majority = torch.where(weighted_deltas.sum(dim=0) >= 0, 1.0, -1.0).to(weighted_deltas.dtype)
    return weighted_deltas.sign() == majority


class GeneralizedTaskArithmetic(MergeMethod):
    needs_base = True

    def __init__(
        self,
        name: str,
        *,
        sparsification: Sparsification | None,
        sign_consensus: bool,
        normalize: bool,
    ) -> None:
        self.name = name
        self.sparsification = sparsification
        self.sign_consensus = sign_consensus
        params = [
            ParameterSpec("weight", per_model=True),
            ParameterSpec("lambda", default=1.0),
            ParameterSpec("normalize", default=normalize),
        ]
        if sparsification is not None:
            params.append(ParameterSpec("density", default=1.0, per_model=True))
        if sparsification in ("random", "della"):
            params.append(ParameterSpec("rescale", default="paper"))
        if sparsification == "della":
            params.append(ParameterSpec("epsilon", default=0.15, per_model=True))
        if sparsification == "outliers":
            params.append(ParameterSpec("gamma", default=0.01, per_model=True))  # the paper's and mergekit's
        self.parameters = tuple(params)

    def _sparsify(self, delta, index, generator, params):
        if self.sparsification == "magnitude":
            return magnitude(delta, params["density"][index])
        if self.sparsification == "random":
            return random_drop(delta, params["density"][index], params["rescale"], generator)
        if self.sparsification == "della":
            return della_magprune(
                delta, params["density"][index], params["epsilon"][index], params["rescale"], generator
            )
        if self.sparsification == "outliers":
            return magnitude_outliers(delta, params["density"][index], params["gamma"][index])
        return delta

    def merge(self, tensors, base, generator, **params):
        if params.get("rescale", "paper") not in ("paper", "l1", "none"):
            raise ValueError(f"{self.name}: rescale must be 'paper', 'l1' or 'none', got {params['rescale']!r}")
        work = work_dtype(base)
        base_w = base.to(work)
        deltas = torch.stack(
            [self._sparsify(t.to(work) - base_w, i, generator, params).to(work) for i, t in enumerate(tensors)]
        )
        weights = torch.tensor(params["weight"], dtype=work).reshape(-1, *([1] * base.dim()))
        deltas = deltas * weights
        if self.sign_consensus:
            agree = elect_sign_mask(deltas).to(work)
            mixed = (deltas * agree).sum(dim=0)
            divisor = (weights * agree).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = deltas.sum(dim=0)
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if params["normalize"]:
            mixed = mixed / divisor
        return base_w + params["lambda"] * mixed
