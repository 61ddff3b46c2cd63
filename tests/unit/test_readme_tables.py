"""The README's result tables are the seeds benchmark's output, rendered: never typed in, never stale."""
from __future__ import annotations

import json

import pytest

from bench.readme import README, render, replace_block
from bench.seeds import DEFAULT_OUT

pytestmark = pytest.mark.unit


def test_readme_results_are_generated_from_the_seeds_benchmark_file():
    results = json.loads(DEFAULT_OUT.read_text())
    assert len(results["seeds"]) >= 3 and len({r["seed"] for r in results["seeds"]}) == len(results["seeds"])
    readme = README.read_text()
    assert replace_block(readme, render(results)) == readme, "run `python -m bench.readme` after `python -m bench.seeds`"


def test_the_file_holds_every_phase_of_every_seed_with_intervals():
    results = json.loads(DEFAULT_OUT.read_text())
    for record in results["seeds"]:
        for phase in ("cognate", "evomerge", "bitnet"):
            for name, metrics in record[phase]["models"].items():
                for metric, value in metrics.items():
                    assert value["ci_low"] <= value["value"] <= value["ci_high"], (record["seed"], phase, name, metric)
        assert set(record["evomerge"]["margins"]) >= {"multitask", "uniform-linear", "base"}
