"""Model Stock (arXiv:2403.19522): pull the average of N fine-tunes back toward the base.

c = mean pairwise cosine of the task vectors; t = N c / (1 + (N - 1) c);
result = t * mean_i(theta_i) + (1 - t) * base. Per tensor, or per row ("filter_wise").
"""
from __future__ import annotations

import itertools

import torch

from services.evomerge.merge_methods.base import MergeMethod, ParameterSpec, work_dtype


class ModelStock(MergeMethod):
    name = "model_stock"
    parameters = (ParameterSpec("filter_wise", default=False),)
    needs_base = True
    min_models = 2

    def merge(self, tensors, base, generator, *, filter_wise):
        work = work_dtype(base)
        shape = base.shape
        if filter_wise:
            flat = lambda x: x.to(work) if x.dim() > 1 else x.to(work).unsqueeze(0)  # noqa: E731
        else:
            flat = lambda x: x.to(work).reshape(-1)  # noqa: E731
        w0, ws = flat(base), [flat(t) for t in tensors]
        deltas = [w - w0 for w in ws]
        cosines = [
            ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-6)).clamp(-1, 1)
            for a, b in itertools.combinations(deltas, 2)
        ]
        cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
        n = len(ws)
        denominator = 1 + (n - 1) * cos
        # Opposing updates (denominator ~ 0) have no finite estimate: keep the base there.
        singular = denominator.abs() < 1e-6
        t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1, denominator))
        return (t * (sum(ws) / n) + (1 - t) * w0).reshape(shape)
