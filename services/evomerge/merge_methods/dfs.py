"""Data-flow-space merging (DFS, Akiba et al. 2024, "Evolutionary Optimization of Model Merging Recipes").

The weights stay as they are; what is searched is the path tokens take through the layers. Candidate layers
are all models' layers, in model order, repeated `repeats` times; an indicator per candidate says whether the
path goes through it. Where the path crosses from model a to model b, the hidden state entering the layer is
multiplied by a scale W[a, b] (the paper learns one per layer pair; we learn one per ordered model pair,
fewer parameters for a small search budget: a deliberate simplification).

The result must stay a plain decoder any tool can load, so the scales are folded into the weights: scaling
the residual stream by s before a layer is the same as leaving it alone and dividing every later layer's
writes to the residual (attention o_proj, MLP down_proj) by s, because every reader of the residual (the
RMSNorms before attention, MLP and head) is scale-invariant. Exact up to RMSNorm's epsilon.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from services.evomerge.merge_methods.base import MergeConfigError, StateDict
from services.evomerge.merge_methods.passthrough import stack_layers

# Tensors that add into the residual stream in a Llama-style decoder layer.
RESIDUAL_WRITERS = ("self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight", "mlp.down_proj.bias")


@dataclass(frozen=True)
class DataFlowPath:
    steps: tuple[tuple[int, int], ...]  # (model index, layer index) in the order tokens flow
    crossing_scales: dict[str, float] = field(default_factory=dict)  # "a->b" -> scale of the hidden state

    def scale_before(self, k: int) -> float:
        if k == 0 or self.steps[k][0] == self.steps[k - 1][0]:
            return 1.0
        return self.crossing_scales.get(f"{self.steps[k - 1][0]}->{self.steps[k][0]}", 1.0)

    def residual_factors(self) -> list[float]:
        """Per step, the factor its residual writes are multiplied by: 1 / the product of the scales so far."""
        cumulative, factors = 1.0, []
        for k in range(len(self.steps)):
            s = self.scale_before(k)
            if s <= 0:
                raise MergeConfigError(f"crossing scale must be positive, got {s}")
            cumulative *= s
            factors.append(1.0 / cumulative)
        return factors


def candidate_layers(layer_counts: list[int], repeats: int) -> list[tuple[int, int]]:
    """All models' layers in order, repeated: the slots the indicator array switches on or off."""
    one_pass = [(m, layer) for m, count in enumerate(layer_counts) for layer in range(count)]
    return one_pass * repeats


def path_from_indicators(candidates: list[tuple[int, int]], include: list[bool], scales: dict[str, float]) -> DataFlowPath:
    if len(include) != len(candidates):
        raise MergeConfigError(f"{len(include)} indicators for {len(candidates)} candidate layers")
    return DataFlowPath(tuple(c for c, on in zip(candidates, include) if on), dict(scales))


def dfs_merge(models: list[StateDict], path: DataFlowPath) -> StateDict:
    for name in RESIDUAL_WRITERS[::2]:
        if not any(key.endswith(name) for key in models[0]):
            raise MergeConfigError(f"data-flow merging folds scales into {name}, which these models lack")
    factors = path.residual_factors()
    return stack_layers(models, list(path.steps), {suffix: factors for suffix in RESIDUAL_WRITERS})

