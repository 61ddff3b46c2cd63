"""Linear merge ("model soups", arXiv:2203.05482): sum_i w_i theta_i, divided by sum_i w_i when normalizing."""
from __future__ import annotations

import torch

from services.evomerge.merge_methods.base import MergeMethod, ParameterSpec


class LinearMerge(MergeMethod):
    name = "linear"
    parameters = (ParameterSpec("weight", default=1.0, per_model=True), ParameterSpec("normalize", default=True))

    def merge(self, tensors, base, generator, *, weight, normalize):
        work = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
        result = sum(w * t.to(work) for w, t in zip(weight, tensors))
        if normalize:
            total = sum(weight)
            if abs(total) < 1e-8:
                raise ValueError("linear merge: weights sum to zero, cannot normalize")
            result = result / total
        return result
