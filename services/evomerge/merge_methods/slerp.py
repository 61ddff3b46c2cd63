"""Spherical linear interpolation between two models, tensor by tensor (Shoemake 1985; mergekit "slerp").

The angle comes from the flattened, normalized tensors; the interpolation applies to the raw tensors, so
magnitudes are interpolated too. Nearly parallel tensors fall back to linear interpolation. t=0 gives the
first model and t=1 the second, exactly: the coefficients are then exactly 1 and 0.
"""
from __future__ import annotations

import math

import torch

from services.evomerge.merge_methods.base import MergeMethod, ParameterSpec, work_dtype

DOT_THRESHOLD = 0.9995  # |cos| above this: sin(angle) is too small to divide by, use lerp
EPS = 1e-8


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    work = work_dtype(v0)
    a, b = v0.to(work), v1.to(work)
    norm_a, norm_b = a.norm(), b.norm()
    unit_a = a / norm_a if norm_a > EPS else a
    unit_b = b / norm_b if norm_b > EPS else b
    dot = float((unit_a * unit_b).sum().clamp(-1, 1))
    if abs(dot) > DOT_THRESHOLD:
        return (1 - t) * a + t * b
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    return (math.sin((1 - t) * theta) / sin_theta) * a + (math.sin(t * theta) / sin_theta) * b


class SlerpMerge(MergeMethod):
    name = "slerp"
    parameters = (ParameterSpec("t"),)
    min_models = max_models = 2

    def merge(self, tensors, base, generator, *, t):
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"slerp: t={t} is outside [0, 1]")
        return slerp(t, tensors[0], tensors[1])
