"""Lossless codecs for ternary weights: 2 bits a weight, or base 3 (five trits a byte).

Both codecs work on the row-major flattening of the weight, so a layer of any shape packs the same way,
and both map the weight w in {-1, 0, 1} to the code c = w + 1 in {0, 1, 2}.

    2-bit:  byte = c0 | c1 << 2 | c2 << 4 | c3 << 6        ceil(n / 4) bytes,  2 bits a weight
    base-3: byte = c0 + 3 c1 + 9 c2 + 27 c3 + 81 c4 (<= 242) ceil(n / 5) bytes, 1.6 bits a weight

llama.cpp's TQ2_0 and TQ1_0 are the same two ideas in blocks of 256 weights with an fp16 scale per block
(2.0625 and 1.6875 bits a weight); here the scale is BitNet b1.58's one absmean scale per tensor, stored
beside the payload. Unpacking reads a 256-entry table (byte -> its 4 or 5 codes) instead of llama.cpp's
shift tricks: one gather, and the same code path for both codecs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class Codec:
    name: str
    base: int  # 4 for 2-bit fields (code 3 unused), 3 for trits
    per_byte: int  # weights stored in one byte

    def packed_bytes(self, numel: int) -> int:
        return math.ceil(numel / self.per_byte)

    @cached_property
    def _place_values(self) -> torch.Tensor:
        return torch.tensor([self.base**i for i in range(self.per_byte)], dtype=torch.int32)

    @cached_property
    def _table(self) -> torch.Tensor:
        """(256, per_byte) int8: the weights each byte value holds, for unpacking by lookup."""
        byte = torch.arange(256, dtype=torch.int32).unsqueeze(1)
        return (byte // self._place_values % self.base - 1).to(torch.int8)


TWO_BIT = Codec("2bit", base=4, per_byte=4)
BASE3 = Codec("base3", base=3, per_byte=5)
CODECS = {codec.name: codec for codec in (TWO_BIT, BASE3)}


def get_codec(name: str) -> Codec:
    if name not in CODECS:
        raise ValueError(f"unknown ternary packing {name!r}; choose one of {sorted(CODECS)}")
    return CODECS[name]


def pack_ternary(weights: torch.Tensor, codec: Codec) -> torch.Tensor:
    """Ternary tensor of any shape -> 1-D uint8 payload of codec.packed_bytes(numel) bytes."""
    flat = weights.detach().reshape(-1)
    if not torch.isin(flat, torch.tensor([-1, 0, 1], dtype=flat.dtype)).all():
        raise ValueError("pack_ternary takes only the values -1, 0 and 1")
    padded = torch.zeros(codec.packed_bytes(flat.numel()) * codec.per_byte, dtype=torch.int32)
    padded[: flat.numel()] = flat.to(torch.int32) + 1
    return (padded.view(-1, codec.per_byte) * codec._place_values).sum(dim=1).to(torch.uint8)


def unpack_ternary(packed: torch.Tensor, shape: tuple[int, ...], codec: Codec) -> torch.Tensor:
    """Inverse of pack_ternary: uint8 payload -> int8 tensor of `shape` holding -1, 0, 1.

    Example (2-bit): the byte 0b10_01_00_10 = 146 holds the codes 2, 0, 1, 2 (lowest bits first),
    that is the weights 1, -1, 0, 1.
    """
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != codec.packed_bytes(numel):
        raise ValueError(
            f"{codec.name} payload for shape {tuple(shape)} must be 1-D uint8 of {codec.packed_bytes(numel)} bytes, "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    return codec._table.to(packed.device)[packed.long()].reshape(-1)[:numel].reshape(shape)


def bits_per_weight(numel: int, codec: Codec, scale_bytes: int = 4) -> float:
    """Exact storage cost of one packed tensor: payload plus its per-tensor scale, in bits a weight."""
    return 8 * (codec.packed_bytes(numel) + scale_bytes) / numel
