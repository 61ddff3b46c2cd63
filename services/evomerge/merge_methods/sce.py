"""SCE (FuseChat, arXiv:2408.07990): Select, Calculate, Erase, then fuse the task vectors.

On task vectors delta_i = theta_i - base:
  1. select: keep the entries whose variance across the task vectors is in the top `select_topk` fraction
     (of the entries with any variance), in every task vector alike;
  2. calculate: one weight per task vector, its mean squared entry, normalized over the task vectors
     (uniform when they are all about zero);
  3. erase: per entry, drop the task vectors whose sign disagrees with the sign of the summed entries;
  4. fuse: the weighted sum of what is left over the sum of the weights left, added to the base.
As mergekit's "sce" (0.1.5), whose parameter names and defaults these are.
"""
from __future__ import annotations

import torch

from services.evomerge.merge_methods.base import MergeMethod, ParameterSpec, work_dtype
from services.evomerge.merge_methods.task_arithmetic import elect_sign_mask

UNIFORM_BELOW = 1e-6  # summed weights this small: the task vectors carry nothing, weigh them alike
DIVISOR_FLOOR = 1e-6


def variance_selection(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """A 0/1 mask over one tensor's entries: the top `fraction` of those that vary across the task vectors."""
    if fraction >= 1:
        return torch.ones_like(deltas[0])
    variance = deltas.var(dim=0, unbiased=False)
    count = int(torch.count_nonzero(variance) * fraction) if fraction > 0 else 0
    mask = torch.zeros_like(variance)
    if count:
        mask.view(-1)[variance.abs().reshape(-1).topk(count).indices] = 1
    return mask


def task_vector_weights(deltas: torch.Tensor) -> torch.Tensor:
    energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = float(energy.sum())
    return torch.full_like(energy, 1 / len(energy)) if abs(total) < UNIFORM_BELOW else energy / total


class SCEMerge(MergeMethod):
    name = "sce"
    parameters = (ParameterSpec("select_topk", default=1.0),)
    needs_base = True

    def merge(self, tensors, base, generator, *, select_topk):
        work = work_dtype(base)
        base_w = base.to(work)
        deltas = torch.stack([t.to(work) - base_w for t in tensors])
        if select_topk < 1:
            deltas = deltas * variance_selection(deltas, select_topk).unsqueeze(0)
        agree = elect_sign_mask(deltas).to(work)
        weights = task_vector_weights(deltas).reshape(-1, *([1] * base.dim())) * agree
        return base_w + (deltas * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=DIVISOR_FLOOR)
