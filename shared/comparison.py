"""Paired bootstrap over scored items: the same resamples for every model, so differences are paired.

A model's scorecard keeps its per-item results in named item sets (the text blocks, each task's problems).
A resample picks, for every item set, n items with replacement; the picks depend only on the set's name,
its size and BOOTSTRAP_SEED, never on the model. So the draws of one statistic for two models scored on
the same items come from the same picks, and the interval of their difference (or of any combination, such
as a fitness margin) is a paired interval, far tighter than two separate intervals would allow. Intervals
are 95% percentile intervals over BOOTSTRAP_SAMPLES resamples, so a report is reproducible.
"""
from __future__ import annotations

import functools
import hashlib

import numpy as np

BOOTSTRAP_SAMPLES = 2_000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


@functools.lru_cache(maxsize=64)
def resample_indices(item_set: str, n: int) -> np.ndarray:
    """(BOOTSTRAP_SAMPLES, n) indices into an item set of n items, the same for every model."""
    if n < 1:
        raise ValueError(f"item set {item_set!r} has no items to resample")
    seed = int.from_bytes(hashlib.sha256(f"{BOOTSTRAP_SEED}|{item_set}|{n}".encode()).digest()[:8], "big")
    indices = np.random.default_rng(seed).integers(0, n, size=(BOOTSTRAP_SAMPLES, n))
    indices.flags.writeable = False
    return indices


def percentile_interval(draws: np.ndarray) -> tuple[float, float]:
    """The central CONFIDENCE interval of bootstrap draws."""
    ordered = np.sort(draws)
    tail = (1 - CONFIDENCE) / 2
    return float(ordered[int(tail * len(ordered))]), float(ordered[int((1 - tail) * len(ordered)) - 1])
