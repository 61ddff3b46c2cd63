"""Our merge operators against mergekit 0.1.5 on the same two tiny checkpoints: equal within 1e-6.

mergekit runs in its own venv (bench/merge_reference.py creates it with uv if missing; the test skips,
saying why, when it cannot be installed). Random masks: mergekit seeds torch's global generator once and
merges tensors in the sorted order of their names; we replay that by giving our operators one generator
seeded alike and walking the tensors in that order. (Our own default seeds a generator per tensor name.)
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from bench.merge_reference import MergekitUnavailable, ensure_mergekit, run_mergekit
from services.evomerge.merge_methods import get_method, merge_state_dicts
from services.evomerge.merge_methods.passthrough import LayerSlice, frankenmerge
from tests.unit.test_merge_methods import tiny_family

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED = 7
TOLERANCE = 1e-6
W = [0.6, 0.4]

# name -> (mergekit config given base/ft0/ft1 paths, our method, our parameters)
CASES = {
    "linear": ({"merge_method": "linear", "models": [("ft0", {"weight": W[0]}), ("ft1", {"weight": W[1]})]},
               "linear", {"weight": W}),
    "slerp": ({"merge_method": "slerp", "base_model": "ft0", "models": [("ft0", {}), ("ft1", {})], "parameters": {"t": 0.3}},
              "slerp", {"t": 0.3}),
    "task_arithmetic": ({"merge_method": "task_arithmetic", "base_model": "base", "parameters": {"lambda": 0.8},
                         "models": [("ft0", {"weight": W[0]}), ("ft1", {"weight": W[1]})]},
                        "task_arithmetic", {"weight": W, "lambda": 0.8}),
    "ties": ({"merge_method": "ties", "base_model": "base",
              "models": [("ft0", {"weight": W[0], "density": 0.5}), ("ft1", {"weight": W[1], "density": 0.3})]},
             "ties", {"weight": W, "density": [0.5, 0.3]}),
    "dare_linear_l1": ({"merge_method": "dare_linear", "base_model": "base",
                        "models": [("ft0", {"weight": W[0], "density": 0.5}), ("ft1", {"weight": W[1], "density": 0.4})]},
                       "dare_linear", {"weight": W, "density": [0.5, 0.4], "rescale": "l1"}),
    # The paper's 1/p rescale: mergekit without rescale, its weights divided by the density.
    "dare_linear_paper": ({"merge_method": "dare_linear", "base_model": "base", "parameters": {"rescale": False},
                           "models": [("ft0", {"weight": W[0] / 0.5, "density": 0.5}),
                                      ("ft1", {"weight": W[1] / 0.4, "density": 0.4})]},
                          "dare_linear", {"weight": W, "density": [0.5, 0.4], "rescale": "paper"}),
    "dare_ties_l1": ({"merge_method": "dare_ties", "base_model": "base",
                      "models": [("ft0", {"weight": W[0], "density": 0.5}), ("ft1", {"weight": W[1], "density": 0.4})]},
                     "dare_ties", {"weight": W, "density": [0.5, 0.4], "rescale": "l1"}),
    "della_l1": ({"merge_method": "della", "base_model": "base",
                  "models": [("ft0", {"weight": W[0], "density": 0.5, "epsilon": 0.1}),
                             ("ft1", {"weight": W[1], "density": 0.4, "epsilon": 0.2})]},
                 "della", {"weight": W, "density": [0.5, 0.4], "epsilon": [0.1, 0.2], "rescale": "l1"}),
    "della_linear_l1": ({"merge_method": "della_linear", "base_model": "base",
                         "models": [("ft0", {"weight": W[0], "density": 0.5}), ("ft1", {"weight": W[1], "density": 0.4})]},
                        "della_linear", {"weight": W, "density": [0.5, 0.4], "rescale": "l1"}),
    "model_stock": ({"merge_method": "model_stock", "base_model": "base", "models": [("ft0", {}), ("ft1", {})]},
                    "model_stock", {}),
}


def mergekit_config(case: dict, paths: dict) -> dict:
    config = {
        "merge_method": case["merge_method"],
        "dtype": "float32",
        "models": [{"model": str(paths[name]), "parameters": params} for name, params in case["models"]],
    }
    if "base_model" in case:
        config["base_model"] = str(paths[case["base_model"]])
    if "parameters" in case:
        config["parameters"] = case["parameters"]
    return config


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    try:
        ensure_mergekit()
    except MergekitUnavailable as error:
        pytest.skip(f"mergekit {error}")
    root = tmp_path_factory.mktemp("parity")
    base, finetunes = tiny_family()
    paths = {"base": root / "base", "ft0": root / "ft0", "ft1": root / "ft1"}
    for name, model in zip(paths, [base, *finetunes]):
        model.save_pretrained(paths[name], safe_serialization=True)
    jobs = [{"config": mergekit_config(case, paths), "out": root / f"out-{name}", "seed": SEED}
            for name, (case, _, _) in CASES.items()]
    jobs.append({"config": frankenmerge_config(paths), "out": root / "out-frankenmerge", "seed": SEED})
    run_mergekit(jobs)
    states = {name: load_file(path / "model.safetensors") for name, path in paths.items()}
    return root, states


def frankenmerge_config(paths: dict) -> dict:
    return {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": str(paths["ft0"]), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(paths["ft1"]), "layer_range": [1, 2]}]},
        ],
    }


def assert_same(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs)
    worst = max((ours[n] - theirs[n]).abs().max().item() for n in theirs)
    assert worst <= TOLERANCE, f"largest difference {worst:.3g}"


@pytest.mark.parametrize("case", list(CASES))
def test_operator_equals_mergekit(family, case):
    root, states = family
    _, method_name, params = CASES[case]
    method = get_method(method_name)
    reference = load_file(root / f"out-{case}" / "model.safetensors")
    ordered = lambda state: {n: state[n] for n in sorted(state)}  # noqa: E731  mergekit's merge order
    shared_generator = torch.Generator().manual_seed(SEED)
    ours = merge_state_dicts(
        method,
        [ordered(states["ft0"]), ordered(states["ft1"])],
        states["base"] if method.needs_base else None,
        lambda name: params,
        generator_for=lambda name: shared_generator,
    )
    assert_same(ours, reference)


def test_frankenmerge_equals_mergekit_passthrough(family):
    root, states = family
    reference = load_file(root / "out-frankenmerge" / "model.safetensors")
    ours = frankenmerge([states["ft0"], states["ft1"]], [LayerSlice(0, 0, 2), LayerSlice(1, 1, 2)])
    assert_same(ours, reference)
