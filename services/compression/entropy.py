"""Entropy coding of ternary weights: a range coder (the `constriction` library) under each tensor's own
static distribution of -1, 0 and 1.

Base-3 packing spends log2(3) = 1.585 bits on a trit at best (1.6 with five trits a byte). When the three
values are not equally likely (zeros dominate, or one sign does), the entropy H(p) of the tensor's trits is
lower, and a range coder under that distribution gets within a few bits per tensor of n H(p). The model is
the tensor's counts of each value (three uint32, stored beside the code, so decoding needs nothing else);
the code is constriction's RangeEncoder words (uint32).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import constriction
import numpy as np
import torch

COUNT_BYTES = 3 * 4


@dataclass
class CodedTrits:
    shape: tuple[int, ...]
    counts: torch.Tensor  # uint32 (3,): how many -1, 0, 1
    words: torch.Tensor  # uint32: the range coder's compressed words

    def payload_bytes(self) -> int:
        return 4 * len(self.words) + COUNT_BYTES


def _model(counts: np.ndarray):
    present = counts > 0
    # A value that never occurs gets no probability mass at all, so it costs nothing to leave out.
    # A constant tensor needs no code at all (its counts say everything), and constriction has no
    # one-symbol model: None.
    if present.sum() < 2:
        return None, np.flatnonzero(present)
    probabilities = counts[present].astype(np.float64) / counts.sum()
    return constriction.stream.model.Categorical(probabilities, perfect=False), np.flatnonzero(present)


def entropy_bits(counts: torch.Tensor) -> float:
    """n H(p): the least number of bits any code under the tensor's value frequencies can reach."""
    counts = counts.double()
    p = counts[counts > 0] / counts.sum()
    return float(-(counts[counts > 0] * torch.log2(p)).sum())


def encode_trits(trits: torch.Tensor) -> CodedTrits:
    """A ternary tensor (int8 of -1, 0, 1) range-coded under its own value counts."""
    symbols = trits.reshape(-1).to(torch.int64).numpy() + 1
    counts = np.bincount(symbols, minlength=3)
    if len(counts) != 3:
        raise ValueError("encode_trits takes only the values -1, 0 and 1")
    model, present = _model(counts)
    index = np.full(3, -1)
    index[present] = np.arange(len(present))
    encoder = constriction.stream.queue.RangeEncoder()
    if model is not None:
        encoder.encode(index[symbols].astype(np.int32), model)
    return CodedTrits(tuple(trits.shape), torch.from_numpy(counts.astype(np.uint32)),
                      torch.from_numpy(encoder.get_compressed().astype(np.uint32)))


def decode_trits(coded: CodedTrits) -> torch.Tensor:
    counts = coded.counts.numpy().astype(np.int64)
    numel = math.prod(coded.shape)
    if counts.sum() != numel:
        raise ValueError(f"the counts {counts.tolist()} do not add up to the shape {coded.shape}")
    model, present = _model(counts)
    if model is None:
        symbols = np.full(numel, present[0])
    else:
        decoder = constriction.stream.queue.RangeDecoder(coded.words.numpy())
        symbols = present[decoder.decode(model, numel)]
    return torch.from_numpy(symbols.astype(np.int8) - 1).reshape(coded.shape)
