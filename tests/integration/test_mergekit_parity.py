"""Our merge operators, `agentforge merge` and EvoMerge's exported champions against mergekit 0.1.5 on the
same tiny checkpoints: equal within 1e-6, and seeded random merges exactly.

mergekit runs in its own venv (bench/merge_reference.py creates it with uv if missing; the test skips,
saying why, when it cannot be installed). Random masks: mergekit seeds torch's global generator once and
merges tensors in the order of the greatest of their inputs' names (sorted names when models merge whole);
our merges draw from one generator seeded alike, in that order.
"""
from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

from bench.merge_reference import MergekitUnavailable, ensure_mergekit, run_mergekit, run_mergekit_multi
from services.evomerge.merge_methods import get_method, merge_state_dicts
from services.evomerge.merge_methods.passthrough import LayerSlice, frankenmerge
from services.evomerge.mergekit_export import champion_as_mergekit
from services.evomerge.mergekit_yaml import run_merge
from services.evomerge.recipe import DataFlowRecipe, ParameterSpaceRecipe, apply_recipe, weights_of
from shared.phase import ForgedModel
from tests.unit.test_evomerge_search import tiny_tokenizer
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
    "breadcrumbs": ({"merge_method": "breadcrumbs", "base_model": "base",
                     "models": [("ft0", {"weight": W[0], "density": 0.6, "gamma": 0.05}),
                                ("ft1", {"weight": W[1], "density": 0.5, "gamma": 0.02})]},
                    "breadcrumbs", {"weight": W, "density": [0.6, 0.5], "gamma": [0.05, 0.02]}),
    "breadcrumbs_ties": ({"merge_method": "breadcrumbs_ties", "base_model": "base",
                          "models": [("ft0", {"weight": W[0], "density": 0.6, "gamma": 0.05}),
                                     ("ft1", {"weight": W[1], "density": 0.5})]},
                         "breadcrumbs_ties", {"weight": W, "density": [0.6, 0.5], "gamma": [0.05, 0.01]}),
    "sce": ({"merge_method": "sce", "base_model": "base", "parameters": {"select_topk": 0.5},
             "models": [("ft0", {}), ("ft1", {})]},
            "sce", {"select_topk": 0.5}),
    "nuslerp": ({"merge_method": "nuslerp", "models": [("ft0", {"weight": W[0]}), ("ft1", {"weight": W[1]})]},
                "nuslerp", {"weight": W}),
    "nuslerp_rows_task_vectors": ({"merge_method": "nuslerp", "base_model": "base",
                                   "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                                   "models": [("ft0", {"weight": W[0]}), ("ft1", {"weight": W[1]})]},
                                  "nuslerp", {"weight": W, "nuslerp_flatten": False, "nuslerp_row_wise": True}),
    "multislerp": ({"merge_method": "multislerp", "models": [("ft0", {"weight": W[0]}), ("ft1", {"weight": W[1]})]},
                   "multislerp", {"weight": W}),
    "multislerp_task_vectors": ({"merge_method": "multislerp", "base_model": "base",
                                 "models": [("ft0", {"weight": W[0]}), ("ft1", {"weight": W[1]})]},
                                "multislerp", {"weight": W}),
    "karcher": ({"merge_method": "karcher", "models": [("ft0", {}), ("ft1", {})]}, "karcher", {}),
}


# mergekit YAML fed unchanged to both tools (deterministic methods; model names are replaced by folders):
# gradients over layers, per-tensor filters, top-level defaults, the base listed among the models.
YAML_CASES = {
    "slerp_filtered_gradients": {
        "merge_method": "slerp", "base_model": "ft0", "models": [{"model": "ft0"}, {"model": "ft1"}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}},
    "ties_per_model_gradients": {
        "merge_method": "ties", "base_model": "base",
        "models": [{"model": "ft0", "parameters": {"weight": [0.2, 0.8], "density": 0.5}},
                   {"model": "ft1", "parameters": {"weight": 0.4, "density": [0.3, 0.7]}}]},
    "task_arithmetic_top_level_base_listed": {
        "merge_method": "task_arithmetic", "base_model": "base", "parameters": {"weight": 0.5, "lambda": 0.9},
        "models": [{"model": "base"}, {"model": "ft0"}, {"model": "ft1", "parameters": {"weight": 0.7}}]},
    "linear_gradient": {
        "merge_method": "linear",
        "models": [{"model": "ft0", "parameters": {"weight": [1.0, 0.2]}}, {"model": "ft1", "parameters": {"weight": [0.1, 1.0]}}]},
    "breadcrumbs_ties_filter": {
        "merge_method": "breadcrumbs_ties", "base_model": "base",
        "parameters": {"density": [{"filter": "mlp", "value": 0.4}, {"value": 0.8}], "gamma": 0.02},
        "models": [{"model": "ft0", "parameters": {"weight": 0.6}}, {"model": "ft1", "parameters": {"weight": 0.4}}]},
    "sce": {"merge_method": "sce", "base_model": "base", "parameters": {"select_topk": 0.3},
            "models": [{"model": "ft0"}, {"model": "ft1"}]},
    "nuslerp": {"merge_method": "nuslerp", "models": [{"model": "ft0", "parameters": {"weight": 0.3}},
                                                      {"model": "ft1", "parameters": {"weight": 0.7}}]},
    "multislerp_base": {"merge_method": "multislerp", "base_model": "base",
                        "models": [{"model": "ft0", "parameters": {"weight": 1.0}}, {"model": "ft1", "parameters": {"weight": 2.0}}]},
    "karcher": {"merge_method": "karcher", "models": [{"model": "ft0"}, {"model": "ft1"}]},
    "model_stock": {"merge_method": "model_stock", "base_model": "base", "models": [{"model": "ft0"}, {"model": "ft1"}]},
    # slices: a frankenmerge (3 layers from two 2-layer models, a source scaling its attention output), and
    # slices whose sources are merged layer by layer, with per-source gradients and per-slice values.
    "passthrough_frankenmerge": {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": "ft0", "layer_range": [0, 2]}]},
                   {"sources": [{"model": "ft1", "layer_range": [1, 2],
                                 "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}}]}]},
    "linear_slices": {
        "merge_method": "linear", "parameters": {"weight": 1.0},
        "slices": [{"sources": [{"model": "ft0", "layer_range": [1, 2]}, {"model": "ft1", "layer_range": [0, 1]}],
                    "parameters": {"weight": 0.3}},
                   {"sources": [{"model": "ft1", "layer_range": [0, 2], "parameters": {"weight": [0.2, 0.9]}},
                                {"model": "ft0", "layer_range": [0, 2]}]}]},
    "ties_slices_slice_base": {
        "merge_method": "ties", "base_model": "base",
        "parameters": {"density": [{"filter": "layers.1.", "value": 0.3}, {"value": 0.6}]},
        "slices": [{"sources": [{"model": "ft0", "layer_range": [0, 2], "parameters": {"weight": 0.7}},
                                {"model": "ft1", "layer_range": [0, 2], "parameters": {"weight": [0.1, 0.5]}},
                                {"model": "base", "layer_range": [0, 2]}]},
                   {"base_model": "ft1",
                    "sources": [{"model": "ft0", "layer_range": [1, 2], "parameters": {"weight": 1.0}},
                                {"model": "ft1", "layer_range": [0, 1]},
                                {"model": "base", "layer_range": [1, 2], "parameters": {"weight": 0.5}}]},
                   {"sources": [{"model": "ft1", "layer_range": [1, 2], "parameters": {"weight": 0.4}},
                                {"model": "base", "layer_range": [0, 1]},
                                {"model": "ft0", "layer_range": [0, 1], "parameters": {"weight": 0.6}}]}]},
    "slerp_slices": {
        "merge_method": "slerp", "base_model": "ft1", "parameters": {"t": [0.2, 0.8]},
        "slices": [{"sources": [{"model": "ft0", "layer_range": [0, 2]}, {"model": "ft1", "layer_range": [0, 2]}]},
                   {"sources": [{"model": "ft1", "layer_range": [0, 1]}, {"model": "ft0", "layer_range": [1, 2]}],
                    "parameters": {"t": 0.4}}]},
}

# Seeded random methods through the same YAML: the masks must be mergekit's, drawn in its order.
RANDOM_YAML_CASES = {
    "dare_ties": {"merge_method": "dare_ties", "base_model": "base",
                  "models": [{"model": "ft0", "parameters": {"weight": 0.6, "density": [0.3, 0.7]}},
                             {"model": "ft1", "parameters": {"weight": 0.4, "density": 0.5}}]},
    "dare_linear_no_rescale": {"merge_method": "dare_linear", "base_model": "base", "parameters": {"rescale": False},
                               "models": [{"model": "base"}, {"model": "ft0", "parameters": {"weight": 0.5, "density": 0.4}},
                                          {"model": "ft1", "parameters": {"weight": 0.5, "density": 1.0}}]},
    "della": {"merge_method": "della", "base_model": "base", "parameters": {"epsilon": 0.1},
              "models": [{"model": "ft0", "parameters": {"weight": 1.0, "density": 0.5}},
                         {"model": "ft1", "parameters": {"weight": 0.5, "density": 0.3}}]},
    # Output layer 0 merges source layers 1, output layer 1 source layers 0: mergekit draws layer 1's masks later.
    "dare_linear_slices": {
        "merge_method": "dare_linear", "base_model": "base", "parameters": {"weight": 0.5, "density": 0.5},
        "slices": [{"sources": [{"model": "ft0", "layer_range": [1, 2]}, {"model": "ft1", "layer_range": [1, 2]},
                                {"model": "base", "layer_range": [1, 2]}]},
                   {"sources": [{"model": "ft1", "layer_range": [0, 1]}, {"model": "base", "layer_range": [0, 1]},
                                {"model": "ft0", "layer_range": [0, 1], "parameters": {"density": 0.2}}]}]},
}


# Champions exported as mergekit YAML: parameter-space recipes (a layer group each with its own values),
# random ones seeded (mergekit runs them with the recipe's seed), and data-flow paths (slices; a merged stage
# first, as a mergekit-multi file).
CHAMPION_SEED = 11
DARE_GROUPS = ({"weight": [0.7, 0.3], "density": [0.5, 1.0]}, {"weight": [0.2, 0.9], "density": [0.8, 0.4]})
TIES = ParameterSpaceRecipe(method="ties", models=("ft0", "ft1"), base="base",
                            groups=({"weight": [0.7, 0.3], "density": [0.5, 0.6]},
                                    {"weight": [0.2, 0.9], "density": [0.8, 0.4]}))
CHAMPIONS = {
    "ties": TIES,
    "slerp": ParameterSpaceRecipe(method="slerp", models=("ft0", "ft1"), groups=({"t": 0.2}, {"t": 0.9})),
    "task_arithmetic": ParameterSpaceRecipe(method="task_arithmetic", models=("ft0", "ft1"), base="base",
                                            shared={"lambda": 0.8}, groups=({"weight": [1.0, 0.0]}, {"weight": [0.4, 0.6]})),
    "dare_ties_paper_rescale": ParameterSpaceRecipe(method="dare_ties", models=("ft0", "ft1"), base="base",
                                                    groups=DARE_GROUPS, seed=CHAMPION_SEED),
    "dare_linear_l1": ParameterSpaceRecipe(method="dare_linear", models=("ft0", "ft1"), base="base",
                                           shared={"rescale": "l1"}, groups=DARE_GROUPS, seed=CHAMPION_SEED),
    "della_no_rescale": ParameterSpaceRecipe(method="della", models=("ft0", "ft1"), base="base", seed=CHAMPION_SEED,
                                             shared={"rescale": "none", "epsilon": 0.1},
                                             groups=({"weight": [0.5, 0.5], "density": [0.3, 0.6]},) * 2),
    "data_flow": DataFlowRecipe(models=("ft0", "ft1"), steps=((0, 0), (1, 1), (1, 0), (0, 1), (0, 1)),
                                crossing_scales={"0->1": 0.8, "1->0": 1.5}),
    "data_flow_over_a_merged_stage": DataFlowRecipe(
        models=(ParameterSpaceRecipe(method="dare_ties", models=("ft0", "ft1"), base="base", groups=DARE_GROUPS,
                                     seed=CHAMPION_SEED), "ft1"),
        steps=((0, 0), (0, 1), (1, 1), (0, 1)), crossing_scales={"0->1": 1.25, "1->0": 0.5}),
}


def exported(name: str) -> dict | list[dict]:
    config, note = champion_as_mergekit(CHAMPIONS[name], n_layers=2)
    assert config is not None, note
    return config


def with_folders(config: dict, paths: dict) -> dict:
    """The YAML case with model names replaced by their folders, in float32 as every parity merge is."""
    folder = lambda name: str(paths.get(name, name))  # noqa: E731  a stage's name stays: mergekit-multi resolves it
    resolved = {**config, "dtype": "float32"}
    if "models" in config:
        resolved["models"] = [{**m, "model": folder(m["model"])} for m in config["models"]]
    if "slices" in config:
        resolved["slices"] = [{**s, "sources": [{**source, "model": folder(source["model"])} for source in s["sources"]],
                               **({"base_model": folder(s["base_model"])} if "base_model" in s else {})}
                              for s in config["slices"]]
    if "base_model" in config:
        resolved["base_model"] = folder(config["base_model"])
    return resolved


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
    jobs += [{"config": with_folders(case, paths), "out": root / f"yaml-{name}", "seed": SEED}
             for name, case in {**YAML_CASES, **RANDOM_YAML_CASES}.items()]
    single = [name for name in CHAMPIONS if isinstance(exported(name), dict)]
    jobs += [{"config": with_folders(exported(name), paths), "out": root / f"champion-{name}", "seed": CHAMPION_SEED}
             for name in single]
    run_mergekit(jobs)
    for name in set(CHAMPIONS) - set(single):
        run_mergekit_multi([with_folders(document, paths) for document in exported(name)], root / f"champion-{name}",
                           CHAMPION_SEED)
    states = {name: load_file(path / "model.safetensors") for name, path in paths.items()}
    return root, states, paths


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
    root, states, _ = family
    _, method_name, params = CASES[case]
    method = get_method(method_name)
    reference = load_file(root / f"out-{case}" / "model.safetensors")
    # The base mergekit is given, where our method uses one (slerp's base_model only names its first model).
    base = CASES[case][0].get("base_model")
    ours = merge_state_dicts(method, [states["ft0"], states["ft1"]], states[base] if base == "base" else None,
                             lambda name: params, seed=SEED)
    assert_same(ours, reference)


def test_frankenmerge_equals_mergekit_passthrough(family):
    root, states, _ = family
    reference = load_file(root / "out-frankenmerge" / "model.safetensors")
    ours = frankenmerge([states["ft0"], states["ft1"]], [LayerSlice(0, 0, 2), LayerSlice(1, 1, 2)])
    assert_same(ours, reference)


def merged_by_us(case: dict, paths: dict, folder) -> dict:
    config = folder / "merge.yml"
    config.write_text(yaml.safe_dump(with_folders(case, paths)))
    run_merge(config, folder / "out", seed=SEED)
    return load_file(folder / "out" / "model.safetensors")


@pytest.mark.parametrize("case", list(YAML_CASES))
def test_the_same_mergekit_yaml_gives_mergekits_weights(family, case, tmp_path):
    root, _, paths = family
    assert_same(merged_by_us(YAML_CASES[case], paths, tmp_path), load_file(root / f"yaml-{case}" / "model.safetensors"))


@pytest.mark.parametrize("case", list(RANDOM_YAML_CASES))
def test_the_same_seed_gives_mergekits_random_merge_exactly(family, case, tmp_path):
    root, _, paths = family
    ours = merged_by_us(RANDOM_YAML_CASES[case], paths, tmp_path)
    theirs = load_file(root / f"yaml-{case}" / "model.safetensors")
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


@pytest.mark.parametrize("name", list(CHAMPIONS))
def test_an_exported_champion_run_by_mergekit_reproduces_its_weights(family, name):
    root, states, _ = family
    base, finetunes = tiny_family()
    parents = [ForgedModel(model, tiny_tokenizer(), parent)
               for model, parent in zip([base, *finetunes], ["base", "ft0", "ft1"])]
    ours = weights_of(apply_recipe(CHAMPIONS[name], parents).model)
    assert_same(ours, load_file(root / f"champion-{name}" / "model.safetensors"))
