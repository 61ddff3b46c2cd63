"""Linear merge ("model soups", arXiv:2203.05482): sum_i w_i theta_i, divided by sum_i w_i when normalizing."""
from __future__ import annotations

from services.evomerge.merge_methods.base import MergeMethod, ParameterSpec, work_dtype


class LinearMerge(MergeMethod):
    name = "linear"
    parameters = (ParameterSpec("weight", default=1.0, per_model=True), ParameterSpec("normalize", default=True))

    def merge(self, tensors, base, generator, *, weight, normalize):
        work = work_dtype(tensors[0])
        result = sum(w * t.to(work) for w, t in zip(weight, tensors))
        if normalize:
            total = sum(weight)
            if abs(total) < 1e-8:
                raise ValueError("linear merge: weights sum to zero, cannot normalize")
            result = result / total
        return result
