"""The Karcher mean (mergekit "karcher"): the Riemannian centre of mass of the models on the hypersphere.

Every model weighs the same. Each tensor is split into its norm and its direction; directions of tensors
with a norm below `tol` take no part. Starting from the normalized mean direction, each iteration moves
along the mean of the log maps (theta / sin theta)(u - cos theta m) by its length with the exponential map,
until that length falls below `tol` or `max_iter` iterations; the result is the mean direction scaled to the
mean norm of all tensors (as mergekit 0.1.5 does).
"""
from __future__ import annotations

import torch

from services.evomerge.merge_methods.base import MergeConfigError, MergeMethod, ParameterSpec, work_dtype


def karcher_mean(tensors: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    norms = [t.norm() for t in tensors]
    share = 1.0 / len(tensors)
    kept = [(t / n) for t, n in zip(tensors, norms, strict=True) if float(n) > tol]
    if not kept:
        return torch.zeros_like(tensors[0])
    alpha = 1.0 / len(kept)
    mean = sum(alpha * u for u in kept)
    mean = kept[0].clone() if float(mean.norm()) < tol else mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for unit in kept:
            cos = torch.dot(mean.reshape(-1), unit.reshape(-1)).clamp(-1.0, 1.0)
            theta = torch.arccos(cos)
            if float(theta) >= tol:
                tangent += alpha * (theta / torch.sin(theta)) * (unit - cos * mean)
        length = tangent.norm()
        if float(length) < tol:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * (tangent / length)
        if float(mean.norm()) > tol:
            mean = mean / mean.norm()
    return sum(share * n for n in norms) * mean


class KarcherMerge(MergeMethod):
    name = "karcher"
    parameters = (ParameterSpec("max_iter", default=10), ParameterSpec("tol", default=1e-5))

    def merge(self, tensors, base, generator, *, max_iter, tol):
        if base is not None:
            raise MergeConfigError("karcher averages its models as they are: it takes no base model")
        if len(tensors) == 1:
            return tensors[0]
        work = work_dtype(tensors[0])
        return karcher_mean([t.to(work) for t in tensors], max_iter, tol)
