"""Multi-SLERP (mergekit "multislerp"): a weighted mean of any number of models on the hypersphere.

Each tensor (a task vector theta_i - base where a base is given) is flattened and projected to the unit
sphere; the weighted Euclidean mean of the unit vectors, renormalized, is the tangent point; the unit
vectors are projected onto its tangent space, averaged there with the weights, and mapped back with the
exponential map; the result is scaled to the weighted mean of the norms. Two exactly opposed inputs that
cancel fall back to the linear mean; more than two that cancel are an error.
"""
from __future__ import annotations

import torch

from services.evomerge.merge_methods.base import MergeConfigError, MergeMethod, ParameterSpec, work_dtype


def multislerp(tensors: list[torch.Tensor], weights: list[float], normalize: bool, eps: float) -> torch.Tensor:
    stacked = torch.stack(tensors)
    flat = stacked.reshape(len(tensors), -1)
    w = torch.tensor(weights, dtype=flat.dtype)
    if normalize:
        w = w / w.sum()
    norms = flat.norm(dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(dim=0)
    if mean.norm() < eps:
        if len(tensors) == 2:
            return (stacked[0] * w[0] + stacked[1] * w[1]).reshape(tensors[0].shape)
        raise MergeConfigError("multislerp: the weighted unit tensors sum to zero (opposed inputs whose weights "
                               "cancel); change the weights")
    mean = mean / mean.norm()
    tangents = units - (units * mean).sum(dim=-1, keepdim=True) * mean
    step = (tangents * w[:, None]).sum(dim=0)
    length = step.norm() + eps
    on_sphere = mean * torch.cos(length) + step * (torch.sin(length) / length)
    return (on_sphere * (norms.squeeze(-1) * w).sum()).reshape(tensors[0].shape)


class MultiSlerpMerge(MergeMethod):
    name = "multislerp"
    parameters = (ParameterSpec("weight", per_model=True), ParameterSpec("normalize_weights", default=True),
                  ParameterSpec("eps", default=1e-8))

    def merge(self, tensors, base, generator, *, weight, normalize_weights, eps):
        if len(tensors) == 1:
            return tensors[0]
        work = work_dtype(tensors[0])
        inputs = [t.to(work) for t in tensors]
        if base is None:
            return multislerp(inputs, weight, normalize_weights, eps)
        base_w = base.to(work)
        return base_w + multislerp([t - base_w for t in inputs], weight, normalize_weights, eps)
