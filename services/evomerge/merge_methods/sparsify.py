"""Sparsification of task vectors (delta = fine-tuned - base) before they are combined.

- magnitude (TIES, arXiv:2306.01708): keep the top `density` fraction by |delta|, no rescale.
- random (DARE, arXiv:2311.03099): keep each entry with probability p = density, i.e. drop rate 1 - p,
  and rescale the survivors by 1/p = 1/(1 - drop rate), as the paper does.
- della (DELLA MagPrune, arXiv:2406.11617): the keep probability of an entry grows with its magnitude rank
  inside its row, from density - epsilon to density + epsilon; survivors are rescaled by 1/p_entry.
- outliers (Model Breadcrumbs, arXiv:2312.06795): drop the `gamma` fraction of largest |delta| (the outliers)
  and as many of the smallest as it takes to keep a `density` fraction; no rescale. When density + gamma
  exceeds 1, fewer outliers are dropped so that density is kept (as mergekit does).

Rescale "paper" is the papers' unbiased 1/p. Rescale "l1" is mergekit's variant: scale the masked delta
so its L1 norm equals the original delta's. "none" keeps the survivors as they are.
"""
from __future__ import annotations

from typing import Literal

import torch

from services.evomerge.merge_methods.base import work_dtype

Rescale = Literal["paper", "l1", "none"]
L1_EPS = 1e-7  # mergekit's tolerance: tiny norms are left unscaled


def _rescale_l1(delta: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    before, after = delta.abs().sum(), masked.abs().sum()
    if before < L1_EPS or after < L1_EPS:
        return masked
    return masked * (before / after)


def magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    keep = max(1, int(density * delta.numel()))
    order = torch.argsort(delta.abs().reshape(-1).float(), descending=True)
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    mask[order[:keep]] = 1
    return delta * mask.reshape(delta.shape)


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    if density >= 1:
        return delta
    total = delta.numel()
    keep, outliers = int(density * total), int(gamma * total)
    smallest = max(0, total - keep - outliers)  # dropped from the bottom; the top `outliers` go as well
    order = torch.argsort(delta.abs().reshape(-1).float())  # ascending
    mask = torch.zeros(total, dtype=delta.dtype)
    mask[order[smallest : smallest + keep]] = 1
    return delta * mask.reshape(delta.shape)


def random_drop(delta: torch.Tensor, density: float, rescale: Rescale, generator: torch.Generator) -> torch.Tensor:
    if density >= 1:
        return delta
    work = delta.to(work_dtype(delta))
    # Drawn even at density 0, as mergekit does: a shared generator must stay where mergekit's would be.
    mask = torch.bernoulli(torch.full_like(work, max(density, 0.0)), generator=generator)
    if density <= 0:
        return torch.zeros_like(delta)
    masked = work * mask
    if rescale == "paper":
        return masked / density
    if rescale == "l1":
        return _rescale_l1(work, masked)
    return masked


def della_magprune(
    delta: torch.Tensor, density: float, epsilon: float, rescale: Rescale, generator: torch.Generator
) -> torch.Tensor:
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if density - epsilon <= 0 or density + epsilon >= 1:
        raise ValueError(f"della: density {density} +/- epsilon {epsilon} must stay inside (0, 1)")
    work = delta.to(work_dtype(delta))
    rows = work if work.dim() >= 2 else work.unsqueeze(0)
    # rank 1 = smallest magnitude in its row; normalized to [0, 1] across the row
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(work.dtype) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    rank01 = ((ranks - low) / (high - low)).clamp(0, 1)
    keep_prob = (density - epsilon) + rank01 * 2 * epsilon
    mask = torch.bernoulli(keep_prob, generator=generator)
    masked = rows * mask
    if rescale == "paper":
        masked = masked / keep_prob
    elif rescale == "l1":
        masked = _rescale_l1(rows, masked)
    return masked.reshape(delta.shape)
