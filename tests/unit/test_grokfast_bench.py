"""bench.grokfast's pieces at a micro size: the split, steps-to-target, one run with and without the filter."""
from dataclasses import replace

import pytest
import torch

from bench.grokfast import (
    QUICK,
    _bound,
    fastest,
    make_splits,
    steps_to_accuracy,
    train_run,
    tune_baseline_lr,
)

pytestmark = pytest.mark.unit

MICRO = replace(QUICK, modulus=7, dim=16, heads=2, max_steps=30, eval_every=10)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_steps_to_accuracy_is_the_first_step_at_or_above_the_target():
    curve = [(10, 0.2), (20, 0.95), (30, 0.5), (40, 0.99)]
    assert steps_to_accuracy(curve, 0.95) == 20
    assert steps_to_accuracy(curve, 0.96) == 40
    assert steps_to_accuracy(curve, 1.0) is None
    assert steps_to_accuracy([], 0.5) is None


def test_splits_are_disjoint_by_problem_cover_every_pair_and_are_labelled_right():
    splits = make_splits(11, 0.5, seed=0)
    pairs = {name: {tuple(row[:2].tolist()) for row in inputs} for name, (inputs, _) in splits.items()}
    assert sum(len(p) for p in pairs.values()) == 121 == len(set().union(*pairs.values()))
    assert not pairs["train"] & pairs["validation"] and not pairs["train"] & pairs["test"]
    assert not pairs["validation"] & pairs["test"]
    assert len(pairs["train"]) == 60 and len(pairs["validation"]) == 30 and len(pairs["test"]) == 31
    for inputs, labels in splits.values():
        assert torch.equal(labels, (inputs[:, 0] + inputs[:, 1]) % 11) and bool((inputs[:, 2] == 11).all())
    again = make_splits(11, 0.5, seed=0)
    assert all(torch.equal(splits[name][0], again[name][0]) for name in splits)


def test_a_run_is_reproducible_and_the_filter_changes_it():
    splits = make_splits(MICRO.modulus, MICRO.train_fraction, MICRO.data_seed)
    plain = train_run(splits, MICRO, 1e-3, grokfast=False, seed=1)
    assert train_run(splits, MICRO, 1e-3, grokfast=False, seed=1)["final_train_loss"] == plain["final_train_loss"]
    filtered = train_run(splits, MICRO, 1e-3, grokfast=True, seed=1)
    assert filtered["final_train_loss"] != plain["final_train_loss"]


def test_a_run_that_misses_the_target_is_censored_at_the_cap_and_one_that_reaches_it_stops():
    splits = make_splits(MICRO.modulus, MICRO.train_fraction, MICRO.data_seed)
    missed = train_run(splits, replace(MICRO, target=1.01), 1e-3, grokfast=False, seed=1)
    assert missed["censored"] and missed["steps"] == missed["final_step"] == MICRO.max_steps
    reached = train_run(splits, replace(MICRO, target=0.0), 1e-3, grokfast=False, seed=1)
    assert not reached["censored"] and reached["steps"] == reached["final_step"] == MICRO.eval_every


def test_the_fastest_run_has_the_fewest_steps_censored_runs_last_ties_to_the_smaller_lr():
    runs = [{"lr": 3e-3, "steps": 30, "censored": True}, {"lr": 2e-3, "steps": 40, "censored": False},
            {"lr": 1e-3, "steps": 40, "censored": False}, {"lr": 5e-3, "steps": 50, "censored": False}]
    assert fastest(runs)["lr"] == 1e-3
    assert fastest(runs[:1] + runs[3:])["lr"] == 5e-3


def test_tuning_runs_the_grid_on_multiples_of_grokfast_lr():
    splits = make_splits(MICRO.modulus, MICRO.train_fraction, MICRO.data_seed)
    lr, runs = tune_baseline_lr(splits, replace(MICRO, max_steps=10), [1, 3], seed=0)
    assert [run["lr"] for run in runs] == pytest.approx([MICRO.grokfast_lr, 3 * MICRO.grokfast_lr])
    assert not any(run["grokfast"] for run in runs) and lr == fastest(runs)["lr"]


def test_a_ratio_with_a_censored_run_is_named_a_bound():
    assert _bound({"censored": False}, {"censored": False}) == "value"
    assert _bound({"censored": True}, {"censored": False}) == "lower bound"
    assert _bound({"censored": False}, {"censored": True}) == "upper bound"
