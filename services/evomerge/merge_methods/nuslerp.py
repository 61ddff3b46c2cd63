"""NuSLERP (mergekit "nuslerp"): spherical interpolation of two models by their weights, on the whole
tensor, row by row, or on task vectors.

t = w_1 / (w_0 + w_1) (0.5 when the weights cancel). With a base model it interpolates the task vectors
theta_i - base and adds the base back (slerp on raw weights cannot). `flatten` (the default) takes the
angle between the whole tensors as slerp.py does; otherwise each row (`row_wise`: each column vector of
dimension 0) is interpolated on its own. Vectors within eps of colinear are interpolated linearly.
Differs from slerp.py only in that colinearity test (1 - cos^2 <= eps^2 instead of |cos| > 0.9995).
"""
from __future__ import annotations

import torch

from services.evomerge.merge_methods.base import MergeMethod, ParameterSpec, work_dtype

EPS = 1e-8
NORM_FLOOR = 1e-7


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool, flatten: bool) -> torch.Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    unit0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    unit1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    cos = (unit0 * unit1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= EPS**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


class NuSlerpMerge(MergeMethod):
    name = "nuslerp"
    parameters = (ParameterSpec("weight", per_model=True), ParameterSpec("nuslerp_row_wise", default=False),
                  ParameterSpec("nuslerp_flatten", default=True))
    min_models = max_models = 2

    def merge(self, tensors, base, generator, *, weight, nuslerp_row_wise, nuslerp_flatten):
        total = sum(weight)
        t = 0.5 if abs(total) < 1e-6 else weight[1] / total
        work = work_dtype(tensors[0])
        v0, v1 = tensors[0].to(work), tensors[1].to(work)
        if base is None:
            return nuslerp(t, v0, v1, row_wise=nuslerp_row_wise, flatten=nuslerp_flatten)
        base_w = base.to(work)
        return base_w + nuslerp(t, v0 - base_w, v1 - base_w, row_wise=nuslerp_row_wise, flatten=nuslerp_flatten)
