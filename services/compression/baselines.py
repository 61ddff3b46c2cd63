"""The baselines a compressed tensor is compared against at the same bits per weight: round-to-nearest and
HQQ (Badri and Shaji 2023, the `hqq` package), both b-bit asymmetric with a float16 scale and zero per group
of g consecutive weights of a row:

    bits per weight = b + 32 / g         SeedLM's 4 bits: b = 3, g = 32;   its 3 bits: b = 2, g = 32

A coder whose bits per weight no such setting hits (VQ's codebooks add a fraction that depends on the matrix's
size) is compared with the setting of least bits at or above its own: the baselines never get fewer bits.

Round-to-nearest takes each group's min and max; HQQ optimises the zero point (and scale) of each group by
its half-quadratic solver, calibration-free. Both have their scale and zero rounded to float16 before
dequantizing, so the weights compared are the ones the counted bits hold.
"""
from __future__ import annotations

import math

import torch
from hqq.core.quantize import Quantizer

GROUP = 32
PER_GROUP_BITS = 32  # float16 scale and zero


def equal_bits_setting(bits_per_weight: float) -> tuple[int, int]:
    """(b, g) with b + 32 / g equal to bits_per_weight, b an integer the baselines support."""
    nbits = math.ceil(bits_per_weight) - 1
    if nbits < 1 or not math.isclose(nbits + PER_GROUP_BITS / GROUP, bits_per_weight):
        raise ValueError(f"no b-bit, group-{GROUP} setting has exactly {bits_per_weight} bits a weight")
    return nbits, GROUP


def bits_setting_at_least(bits_per_weight: float) -> tuple[int, int]:
    """(b, g) with the least b + 32 / g at or above bits_per_weight (equal to it where one is)."""
    nbits = max(1, math.ceil(bits_per_weight - PER_GROUP_BITS / GROUP))
    return nbits, GROUP


def baseline_bits_per_weight(nbits: int, group: int) -> float:
    return nbits + PER_GROUP_BITS / group


def _groups(weight: torch.Tensor, group: int) -> torch.Tensor:
    if weight.shape[-1] % group:
        raise ValueError(f"rows of {weight.shape[-1]} weights do not split into groups of {group}")
    return weight.detach().float().reshape(-1, group)


def round_to_nearest(weight: torch.Tensor, nbits: int, group: int = GROUP) -> torch.Tensor:
    """Min-max asymmetric b-bit quantization per group, dequantized."""
    groups = _groups(weight, group)
    low = groups.min(dim=1, keepdim=True).values.half().float()
    scale = ((groups.max(dim=1, keepdim=True).values - low) / (2**nbits - 1)).half().float()
    scale[scale == 0] = 1.0  # a constant group (in float16): every code 0, the value its min
    codes = torch.round((groups - low) / scale).clamp(0, 2**nbits - 1)
    return (codes * scale + low).reshape(weight.shape)


def hqq(weight: torch.Tensor, nbits: int, group: int = GROUP) -> torch.Tensor:
    """HQQ's b-bit quantization per group (its optimised zero point), dequantized."""
    _groups(weight, group)
    codes, meta = Quantizer.quantize(weight.detach().float(), nbits=nbits, group_size=group, optimize=True, axis=1,
                                     compute_dtype=torch.float32, device="cpu")
    meta["scale"], meta["zero"] = meta["scale"].half().float(), meta["zero"].half().float()
    return Quantizer.dequantize(codes, meta).reshape(weight.shape).float()
