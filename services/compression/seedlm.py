"""SeedLM (Shafipour et al. 2024, arXiv 2410.10714): a block of weights stored as the seed of a random generator.

Each block of C consecutive weights (row-major) is approximated as w ~ U(s) t, where U(s) is a C x P matrix
the seed s of a 16-bit LFSR generates and t holds P coefficients stored as 4-bit integers with a shared 4-bit
exponent. Per block the file holds the seed (16 bits), the exponent (4 bits) and the coefficients (4P bits):

    bits per weight = (K + 4 + 4 P) / C,   K = 16:   C = 8, P = 3 -> 4 bits;   C = 12, P = 4 -> 3 bits

The encoder tries every one of the 65,535 seeds for every block and keeps the one whose *quantized*
coefficients reconstruct the block best (the paper's search; least squares gives t, then t is quantized and
the error measured with the quantized t). The search is batched: all seeds' U are one tensor, a chunk of
blocks is scored against all of them with matrix products.

The generator: the Fibonacci LFSR x^16 + x^14 + x^13 + x^11 + 1 (period 65,535). U(s) holds the C P states
that follow s, row-major, each mapped to (state - 2^15) / 2^15 in (-1, 1). The paper does not fix the
polynomial or the mapping; any maximal-length one gives the same search space.

Decoding is exact by construction: U's entries are integers over 2^15 and the coefficients integers times
2^e, so a weight is an integer (at most 2^20 in magnitude) times a power of two: float32 holds it exactly,
whatever the order of summation. Our one addition to the paper: the 16 exponents a block may use are a
window [e_base, e_base + 15] fixed per tensor from its largest weight (stored in the file, 4 bytes a tensor),
since the 4-bit exponent alone does not say where the window sits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from shared.phase import ProgressFn, no_progress

SEED_BITS = 16
SEEDS = 2**SEED_BITS - 1  # every nonzero state of the LFSR
EXPONENT_BITS = 4
COEFFICIENT_BITS = 4
Q_MIN, Q_MAX = -(2 ** (COEFFICIENT_BITS - 1)), 2 ** (COEFFICIENT_BITS - 1) - 1
U_DENOMINATOR = 2**15
BLOCKS_PER_CHUNK = 32  # blocks scored against all seeds at once: about 75 MB of float32 at P = 3


@dataclass(frozen=True)
class SeedLMShape:
    block: int = 8  # C
    coefficients: int = 3  # P

    @property
    def bits_per_block(self) -> int:
        return SEED_BITS + EXPONENT_BITS + COEFFICIENT_BITS * self.coefficients

    @property
    def bits_per_weight(self) -> float:
        """The paper's formula, (K + 4 + 4P) / C."""
        return self.bits_per_block / self.block


@dataclass
class SeedLMTensor:
    """One tensor in SeedLM form: what the file stores for it."""

    shape: tuple[int, ...]
    block: int  # C
    seeds: torch.Tensor  # uint16 (blocks,): the LFSR seed of each block
    exponents: torch.Tensor  # uint8 (blocks,): e - exponent_base, in [0, 15]
    coefficients: torch.Tensor  # int8 (blocks, P): in [-8, 7]
    exponent_base: int

    def payload_bytes(self) -> int:
        """Bytes of the seeds plus the nibbles (exponent and coefficients) packed two a byte."""
        blocks, p = self.coefficients.shape
        return 2 * blocks + math.ceil(blocks * (1 + p) / 2)


@cache
def lfsr_cycle() -> np.ndarray:
    """The LFSR's 65,535 states in order, starting from state 1."""
    states = np.empty(SEEDS, dtype=np.int64)
    state = 1
    for i in range(SEEDS):
        states[i] = state
        bit = (state ^ (state >> 2) ^ (state >> 3) ^ (state >> 5)) & 1
        state = (state >> 1) | (bit << 15)
    if state != 1 or len(set(states.tolist())) != SEEDS:
        raise AssertionError("the LFSR polynomial is not maximal-length")
    return states


@cache
def generator_matrices(shape: SeedLMShape) -> torch.Tensor:
    """int32 (65,536, C, P): U(s) * 2^15 for every seed s (row 0, the all-zero state, is unused)."""
    states = lfsr_cycle()
    position = np.empty(SEEDS + 1, dtype=np.int64)
    position[states] = np.arange(SEEDS)
    n = shape.block * shape.coefficients
    following = states[(position[1:, None] + 1 + np.arange(n)[None, :]) % SEEDS]  # (65,535, C P)
    matrices = np.zeros((SEEDS + 1, shape.block, shape.coefficients), dtype=np.int32)
    matrices[1:] = (following - U_DENOMINATOR).reshape(SEEDS, shape.block, shape.coefficients)
    return torch.from_numpy(matrices)


def _blocks(weight: torch.Tensor, block: int) -> torch.Tensor:
    """The tensor's row-major weights in blocks of C, the last block padded with zeros."""
    flat = weight.detach().float().reshape(-1)
    padded = torch.zeros(math.ceil(flat.numel() / block) * block)
    padded[: flat.numel()] = flat
    return padded.view(-1, block)


def encode(weight: torch.Tensor, shape: SeedLMShape = SeedLMShape(), progress: ProgressFn = no_progress) -> SeedLMTensor:
    """Search every seed for every block; keep the seed and quantized coefficients of least squared error."""
    blocks = _blocks(weight, shape.block)
    u = generator_matrices(shape)[1:].double() / U_DENOMINATOR  # (S, C, P), seeds 1..65,535
    gram = u.transpose(1, 2) @ u  # (S, P, P)
    solve = torch.linalg.inv(gram) @ u.transpose(1, 2)  # (S, P, C): least squares t = solve w
    u_flat = u.permute(1, 0, 2).reshape(shape.block, -1).float()  # (C, S P)
    solve_flat = solve.permute(2, 0, 1).reshape(shape.block, -1).float()  # (C, S P)
    gram = gram.float()
    largest = float(blocks.abs().max())
    # The window of exponents: the top one lets a coefficient reach about 4 times the largest weight
    # (least-squares coefficients of a U with entries in (-1, 1) rarely exceed that); tighter windows clamp.
    exponent_top = math.ceil(math.log2(max(largest, 1e-30) * 4 / Q_MAX))
    exponent_base = exponent_top - (2**EXPONENT_BITS - 1)
    work = _Workspace(BLOCKS_PER_CHUNK, shape.coefficients)
    n_blocks = len(blocks)
    blocks = torch.cat([blocks, blocks.new_zeros((-n_blocks % BLOCKS_PER_CHUNK, shape.block))])
    seeds, exponents, coefficients = [], [], []
    chunks = range(0, n_blocks, BLOCKS_PER_CHUNK)
    for index, start in enumerate(chunks):
        best, e, q = work.search(blocks[start:start + BLOCKS_PER_CHUNK], u_flat, solve_flat, gram,
                                 exponent_base, exponent_top)
        seeds.append(best + 1)
        exponents.append(e - exponent_base)
        coefficients.append(q)
        progress((index + 1) / len(chunks), f"SeedLM {tuple(weight.shape)}: block {min(start + BLOCKS_PER_CHUNK, n_blocks)}/{n_blocks}")
    return SeedLMTensor(tuple(weight.shape), shape.block, torch.cat(seeds)[:n_blocks].to(torch.int32).to(torch.uint16),
                        torch.cat(exponents)[:n_blocks].to(torch.uint8), torch.cat(coefficients)[:n_blocks].to(torch.int8),
                        exponent_base)


class _Workspace:
    """The search's buffers for one chunk of blocks against all seeds, allocated once and written in place.
    Allocating them afresh per chunk fragments glibc's heap (measured: about 30 MB more resident memory per
    chunk, 23 GB over the tiny preset's embedding before the OOM killer), and keeping allocations on mmap
    instead costs a page fault per page: half the time went to the kernel."""

    def __init__(self, blocks: int, p: int):
        self.projected, self.t, self.q, self.product = (torch.empty(blocks, SEEDS, p) for _ in range(4))
        self.largest, self.e, self.step, self.quadratic, self.error, self.scratch = (
            torch.empty(blocks, SEEDS) for _ in range(6))

    def search(self, w: torch.Tensor, u_flat, solve_flat, gram, exponent_base: int, exponent_top: int):
        """Per block of w: the best seed's index, its exponent and its quantized coefficients."""
        b, p = len(w), self.q.shape[-1]
        torch.matmul(w, u_flat, out=self.projected.view(b, -1))  # U^T w
        torch.matmul(w, solve_flat, out=self.t.view(b, -1))  # least-squares t
        torch.abs(self.t, out=self.q)
        torch.amax(self.q, dim=-1, out=self.largest)
        self.largest.clamp_(min=1e-30).div_(Q_MAX)
        torch.log2(self.largest, out=self.e)
        self.e.ceil_().clamp_(exponent_base, exponent_top)
        torch.exp2(self.e, out=self.step)
        torch.div(self.t, self.step.unsqueeze(-1), out=self.q)
        self.q.round_().clamp_(Q_MIN, Q_MAX)
        # ||w - U q 2^e||^2 - ||w||^2 = -2 2^e q.(U^T w) + 4^e q^T (U^T U) q
        self.quadratic.zero_()
        for i in range(p):
            for j in range(i, p):
                torch.mul(self.q[..., i], gram[:, i, j], out=self.scratch)
                self.quadratic.addcmul_(self.scratch, self.q[..., j], value=1.0 if i == j else 2.0)
        torch.mul(self.q, self.projected, out=self.product)
        torch.sum(self.product, dim=-1, out=self.error)
        self.error.mul_(self.step).mul_(-2)
        torch.mul(self.step, self.step, out=self.scratch)
        self.error.addcmul_(self.scratch, self.quadratic)
        best = self.error.argmin(dim=1)
        rows = torch.arange(b)
        return best, self.e[rows, best], self.q[rows, best]


def decode(encoded: SeedLMTensor) -> torch.Tensor:
    """The float32 weight the seeds, exponents and coefficients give; exact (see the module docstring)."""
    blocks, p = encoded.coefficients.shape
    shape = SeedLMShape(block=encoded.block, coefficients=p)
    u = generator_matrices(shape)[encoded.seeds.to(torch.int64)].to(torch.int64)  # (blocks, C, P)
    integers = (u @ encoded.coefficients.to(torch.int64).unsqueeze(-1)).squeeze(-1)  # exact integer sums
    scale = torch.exp2(encoded.exponents.double() + encoded.exponent_base - math.log2(U_DENOMINATOR))
    weights = (integers.double() * scale.unsqueeze(-1)).float()
    return weights.reshape(-1)[: math.prod(encoded.shape)].reshape(encoded.shape)

