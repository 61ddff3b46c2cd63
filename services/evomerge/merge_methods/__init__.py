"""Merge methods by name: one registry, one lookup that says what exists when a name is wrong.

Task arithmetic, TIES, DARE, DELLA and Model Breadcrumbs are configured instances of one generalized
task-arithmetic method (as in mergekit), not subclasses. SCE, NuSLERP, Multi-SLERP and the Karcher mean
are modules of their own. Structural merges (frankenmerge, data-flow paths) live in passthrough.py
and dfs.py; they stack layers rather than combine tensors.
"""
from __future__ import annotations

from services.evomerge.merge_methods.base import MergeConfigError, MergeMethod, merge_state_dicts
from services.evomerge.merge_methods.karcher import KarcherMerge
from services.evomerge.merge_methods.linear import LinearMerge
from services.evomerge.merge_methods.model_stock import ModelStock
from services.evomerge.merge_methods.multislerp import MultiSlerpMerge
from services.evomerge.merge_methods.nuslerp import NuSlerpMerge
from services.evomerge.merge_methods.passthrough import PassthroughMerge
from services.evomerge.merge_methods.sce import SCEMerge
from services.evomerge.merge_methods.slerp import SlerpMerge
from services.evomerge.merge_methods.task_arithmetic import GeneralizedTaskArithmetic


class UnknownMergeMethodError(LookupError, ValueError):
    """A failed lookup, and a bad value where configs are validated (pydantic wraps ValueErrors)."""


def _methods() -> dict[str, MergeMethod]:
    gta = GeneralizedTaskArithmetic
    methods = [
        LinearMerge(),
        SlerpMerge(),
        ModelStock(),
        PassthroughMerge(),
        gta("task_arithmetic", sparsification=None, sign_consensus=False, normalize=False),
        gta("ties", sparsification="magnitude", sign_consensus=True, normalize=True),
        gta("dare_linear", sparsification="random", sign_consensus=False, normalize=False),
        gta("dare_ties", sparsification="random", sign_consensus=True, normalize=False),
        gta("della", sparsification="della", sign_consensus=True, normalize=True),
        gta("della_linear", sparsification="della", sign_consensus=False, normalize=False),
        gta("breadcrumbs", sparsification="outliers", sign_consensus=False, normalize=False),
        gta("breadcrumbs_ties", sparsification="outliers", sign_consensus=True, normalize=False),
        SCEMerge(),
        NuSlerpMerge(),
        MultiSlerpMerge(),
        KarcherMerge(),
    ]
    return {method.name: method for method in methods}


METHODS = _methods()


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMergeMethodError(f"no merge method named {name!r}; known: {', '.join(sorted(METHODS))}") from None


__all__ = ["METHODS", "MergeConfigError", "MergeMethod", "UnknownMergeMethodError", "get_method", "merge_state_dicts"]
