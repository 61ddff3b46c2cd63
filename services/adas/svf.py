"""Singular-value fine-tuning (Transformer², Sun et al. 2025) of a ternary model's latent weights.

Each adapted matrix is decomposed once, W = U diag(sigma) V^T (float64 SVD, kept in float32). An expert is
one vector z per adapted matrix, min(m, n) entries, and gives the matrix

    mult = sigmoid(z) * max_mult
    W'   = U diag(sigma * mult) V^T * sum(sigma) / sum(sigma * mult)

as the reference's compose_new_params (SakanaAI/self-adaptive-llms; max_mult 1, z starting at
0.1 + N(0, 0.01)). The rescaling keeps the sum of singular values, so a constant multiplier gives W back.
Experts compose linearly with the alphas normalised to sum 1, as the reference's WeightedCombination
(norm_coeffs) does. It mixes the experts' stored vectors and applies no mask to the mix; we mix the
multipliers, mult = sum_k alpha_k sigmoid(z_k) max_mult, so that a mix is a multiplier of the same range
as each expert's (a deviation: a linear mix of raw z used as a multiplier could go negative).

W' takes the latent weight's place inside the quantizer (a torch parametrization of BitLinear.weight), so
the forward pass stays ternary, ternarize(W'), and z trains through the straight-through estimator. Folding
writes W' into the latent weight: the model handed on is a stock BitNet checkpoint computing exactly what
the adapted one did.

Our deviation: the reference adapts the MLP matrices of an 8B model; the tiny model has four blocks, and
experts here adapt every ternary layer (attention and MLP) unless `targets` says otherwise, the search then
choosing which blocks' attention and MLP keep their adaptation (search.py).
"""
from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from shared.ternary.bitlinear import bit_linears

Vectors = dict[str, torch.Tensor]  # adapted layer name -> z (or a multiplier), min(m, n) entries
INIT_VALUE = 0.1  # the reference's init_val
INIT_NOISE = 0.01


@dataclass(frozen=True)
class Factors:
    u: torch.Tensor  # (m, r)
    s: torch.Tensor  # (r,)
    vh: torch.Tensor  # (r, n)

    @property
    def rank(self) -> int:
        return self.s.numel()

    def bytes(self) -> int:
        return 4 * (self.u.numel() + self.s.numel() + self.vh.numel())


def compose(factors: Factors, multiplier: torch.Tensor) -> torch.Tensor:
    """W' = U diag(sigma * mult) V^T * sum(sigma) / sum(sigma * mult)."""
    scaled = factors.s * multiplier
    return (factors.u * scaled) @ factors.vh * (factors.s.sum() / scaled.sum())


def decompose(model: nn.Module, targets: Sequence[str] = ()) -> dict[str, Factors]:
    """The SVD of every ternary layer's latent weight whose name matches one of `targets` (regular
    expressions searched in the name; none: every ternary layer)."""
    factors = {}
    for name, layer in bit_linears(model):
        if targets and not any(re.search(pattern, name) for pattern in targets):
            continue
        u, s, vh = torch.linalg.svd(layer.weight.detach().double(), full_matrices=False)
        factors[name] = Factors(u.float().contiguous(), s.float().contiguous(), vh.float().contiguous())
    if not factors:
        raise ValueError(f"no ternary layer matches the targets {list(targets)}")
    return factors


def multiplier(z: torch.Tensor, max_mult: float) -> torch.Tensor:
    return torch.sigmoid(z) * max_mult


class SingularValueScaling(nn.Module):
    """The parametrization of one ternary layer's latent weight by its expert vector z."""

    def __init__(self, factors: Factors, z: torch.Tensor, max_mult: float):
        super().__init__()
        self.u, self.s, self.vh = (nn.Buffer(t.clone()) for t in (factors.u, factors.s, factors.vh))
        self.z = nn.Parameter(z.clone())
        self.max_mult = max_mult

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return compose(Factors(self.u, self.s, self.vh), multiplier(self.z, self.max_mult))


def initial_vectors(factors: Mapping[str, Factors], seed: int) -> Vectors:
    generator = torch.Generator().manual_seed(seed)
    return {name: INIT_VALUE + INIT_NOISE * torch.randn(f.rank, generator=generator) for name, f in factors.items()}


def svf_student(model: nn.Module, factors: Mapping[str, Factors], z: Vectors, max_mult: float) -> nn.Module:
    """A copy of a trainable ternary model whose adapted layers are parametrized by z; only z trains."""
    student = copy.deepcopy(model).requires_grad_(False)
    for name, layer in bit_linears(student):
        if name in factors:
            parametrize.register_parametrization(layer, "weight", SingularValueScaling(factors[name], z[name], max_mult))
    return student


def trained_vectors(student: nn.Module) -> Vectors:
    """Each adapted layer's z, detached."""
    return {name: layer.parametrizations.weight[0].z.detach().clone()
            for name, layer in bit_linears(student) if parametrize.is_parametrized(layer, "weight")}


def mixed_multipliers(experts: Sequence[Vectors], alphas: Sequence[float], max_mult: float) -> Vectors:
    """mult = sum_k alpha_k sigmoid(z_k) max_mult, the alphas normalised to sum 1 (all zero: equal weights)."""
    weights = torch.tensor([float(a) for a in alphas])
    if len(weights) != len(experts):
        raise ValueError(f"{len(weights)} mixing weights for {len(experts)} experts")
    if (weights < 0).any():
        raise ValueError(f"mixing weights must be >= 0, got {list(alphas)}")
    weights = weights / weights.sum() if weights.sum() > 0 else torch.full_like(weights, 1 / len(weights))
    return {name: sum(w * multiplier(expert[name], max_mult) for w, expert in zip(weights, experts, strict=True))
            for name in experts[0]}


@torch.no_grad()
def adapted(model: nn.Module, factors: Mapping[str, Factors], multipliers: Vectors) -> nn.Module:
    """A copy of the model with W' folded into the latent weight of each layer `multipliers` names (the
    others unchanged): a plain ternary model."""
    out = copy.deepcopy(model)
    layers = dict(bit_linears(out))
    for name, mult in multipliers.items():
        layers[name].weight.copy_(compose(factors[name], mult))
    return out


def trainable_count(factors: Mapping[str, Factors]) -> int:
    """sum of min(m, n) over the adapted matrices: an expert's size."""
    return sum(f.rank for f in factors.values())
