"""mergekit YAML read by `agentforge merge`: values at a tensor (gradients, filters), slices planned as mergekit
plans them, and every unsupported field, method, parameter or model refused with an error that names it; and
the champion written as mergekit YAML, or the reason it cannot be. Parity with mergekit on the same files is
in tests/integration/test_mergekit_parity.py."""
from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

from services.evomerge.merge_methods import MergeConfigError, get_method
from services.evomerge.mergekit_export import champion_as_mergekit
from services.evomerge.mergekit_yaml import MergekitConfig, MergekitRecipe, read_config, run_merge, setting
from services.evomerge.recipe import DataFlowRecipe, ParameterSpaceRecipe, weights_of
from tests.unit.test_merge_methods import tiny_family

pytestmark = pytest.mark.unit


def test_gradients_interpolate_over_layers_and_filters_pick_by_tensor_name():
    assert setting([0.0, 1.0, 0.0], "x", 0.25) == pytest.approx(0.5)
    assert setting([0.2, 0.8], "x", 1.0) == pytest.approx(0.8)
    filters = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.3}]
    assert setting(filters, "model.layers.0.self_attn.q_proj.weight", 0.5) == pytest.approx(0.5)
    assert setting(filters, "model.layers.0.mlp.up_proj.weight", 0.5) == 0.3
    assert setting([{"filter": "mlp", "value": 1.0}], "lm_head.weight", 0.0) is None


def write(tmp_path, config: dict):
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("config, named", [
    ({"merge_method": "ties", "models": [{"model": "a"}], "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}]},
     "exactly one of `models` and `slices`"),
    ({"merge_method": "ties", "models": [{"model": "a"}], "out_dtype": "float16"}, "out_dtype"),
    ({"merge_method": "nearswap", "models": [{"model": "a"}]}, "nearswap"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"densty": 0.5}}]}, "densty"),
    ({"merge_method": "breadcrumbs", "base_model": "b", "models": [{"model": "a"}], "parameters": {"rescale": True}}, "rescale"),
    ({"merge_method": "linear", "base_model": "b", "models": [{"model": "a"}]}, "base_model"),
    ({"merge_method": "ties", "models": [{"model": "a"}], "dtype": "int4"}, "int4"),
    ({"merge_method": "passthrough", "models": [{"model": "a"}, {"model": "b"}]}, "passthrough takes 1 to 1 models"),
    ({"merge_method": "ties", "models": [{"model": "a"}], "modules": {}}, "modules"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}],
                                                 "residual_weight": 0.5}]}, "residual_weight"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]},
                                                        {"model": "b", "layer_range": [0, 1]}]}]}, "same number of layers"),
    ({"merge_method": "ties", "base_model": "c", "slices": [{"sources": [
        {"model": "a", "layer_range": [0, 1], "parameters": {"weight": 1.0}}]}]}, "base_model 'c' is not among"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}],
                                            "parameters": {"t": 0.5}}]}, r"\['t'\] \(in slices\[0\].parameters\)"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]},
                                                {"sources": [{"model": "a", "layer_range": [1, 2]},
                                                             {"model": "b", "layer_range": [1, 2]}]}]}, "first and the last"),
])
def test_what_we_do_not_run_is_refused_by_name(tmp_path, config, named):
    with pytest.raises(MergeConfigError, match=named):
        MergekitRecipe(read_config(write(tmp_path, config)))


def test_models_must_be_local_folders_and_mergekit_defaults_apply(tmp_path):
    base, (a, b) = tiny_family()
    for name, model in {"base": base, "a": a, "b": b}.items():
        model.save_pretrained(tmp_path / name, safe_serialization=True)
    hub = write(tmp_path, {"merge_method": "ties", "base_model": "base",
                           "models": [{"model": "mistralai/Mistral-7B-v0.1", "parameters": {"weight": 1.0}}]})
    with pytest.raises(MergeConfigError, match="mistralai/Mistral-7B-v0.1.*local"):
        run_merge(hub, tmp_path / "out")
    dare = MergekitRecipe(read_config(write(tmp_path, {
        "merge_method": "dare_ties", "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.5}}, {"model": "b", "parameters": {"weight": 1.0}}]})))
    slices, plan = dare.plan(family_weights())
    tensor = next(planned for planned in plan if planned.output == "model.layers.0.mlp.up_proj.weight")
    params = dare.method.resolve(dare.params(tensor, slices[0], [0, 1]), 2)
    # mergekit's defaults, not our papers': L1 rescale for DARE (ours: 1/p), density 1 where a model gives none.
    assert params["rescale"] == "l1" and params["density"] == [0.5, 1.0] and params["normalize"] is False
    assert get_method("dare_ties").resolve({"weight": 1.0}, 2)["rescale"] == "paper"
    # `models` is mergekit's one slice over all layers, the unlisted base appended as its last source.
    assert [(s.model, s.layer_range) for s in slices[0].sources] == [("a", (0, 2)), ("b", (0, 2)), ("base", (0, 2))]


def family_weights() -> dict:
    base, (a, b) = tiny_family()
    return {name: weights_of(model) for name, model in {"base": base, "a": a, "b": b}.items()}


def test_slices_stack_renumbered_layers_with_mergekits_positions_names_and_order():
    recipe = MergekitRecipe(MergekitConfig.model_validate({
        "merge_method": "linear", "parameters": {"weight": 1.0},
        "slices": [
            {"sources": [{"model": "a", "layer_range": [1, 2]}, {"model": "b", "layer_range": [0, 1]}]},
            {"sources": [{"model": "b", "layer_range": [0, 2],
                          "parameters": {"weight": [{"filter": "layers.1.", "value": 0.25}, {"value": 0.5}]}},
                         {"model": "a", "layer_range": [0, 2]}], "parameters": {"weight": 0.75}},
        ]}))
    slices, plan = recipe.plan(family_weights())
    by_output = {tensor.output: tensor for tensor in plan}
    assert sum(tensor.output.endswith("self_attn.q_proj.weight") for tensor in plan) == 3  # 1 + 2 output layers
    # Output layer 0 is a's layer 1 with b's layer 0; layers 1 and 2 are the second slice's layers 0 and 1.
    assert by_output["model.layers.0.mlp.up_proj.weight"].inputs == ("model.layers.1.mlp.up_proj.weight",
                                                                     "model.layers.0.mlp.up_proj.weight")
    assert by_output["model.layers.2.mlp.up_proj.weight"].inputs == ("model.layers.1.mlp.up_proj.weight",) * 2
    # Gradient positions restart in each slice; a one-layer slice reads its gradients at t = 1.
    assert [by_output[f"model.layers.{k}.mlp.up_proj.weight"].t for k in range(3)] == [1.0, 0.0, 1.0]
    # Embeddings merge the first slice's sources, the final norm and head the last slice's, at t = 0.
    assert (by_output["model.embed_tokens.weight"].slice, by_output["lm_head.weight"].slice) == (0, 1)
    assert plan[0].output == "model.embed_tokens.weight" and plan[-1].output == "lm_head.weight"
    # A source's own filter reads the source's tensor name (b's layer 1 is output layer 2); the slice's
    # value applies where the source gives none.
    assert recipe.params(by_output["model.layers.2.mlp.up_proj.weight"], slices[1], [0, 1])["weight"] == [0.25, 0.75]
    assert recipe.params(by_output["model.layers.1.mlp.up_proj.weight"], slices[1], [0, 1])["weight"] == [0.5, 0.75]
    assert by_output["model.layers.0.mlp.up_proj.weight"].mergekit_order == "model.layers.1.mlp.up_proj.weight"


def test_a_random_method_over_repeated_layers_is_refused_not_guessed():
    repeated = {"merge_method": "dare_linear", "base_model": "base", "parameters": {"weight": 0.5, "density": 0.5},
                "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}, {"model": "base", "layer_range": [0, 1]}]}] * 2}
    with pytest.raises(MergeConfigError, match="order between them"):
        MergekitRecipe(MergekitConfig.model_validate(repeated)).merge(family_weights(), seed=0)


def test_a_half_precision_dtype_is_computed_in_float32_and_written_in_it(tmp_path, caplog):
    base, (a, b) = tiny_family()
    for name, model in {"base": base, "a": a, "b": b}.items():
        model.save_pretrained(tmp_path / name, safe_serialization=True)
        model.to(torch.bfloat16).save_pretrained(tmp_path / f"{name}-bf16", safe_serialization=True)
    ties = {"merge_method": "ties", "base_model": "base",
            "models": [{"model": "a", "parameters": {"weight": 0.6, "density": 0.5}}, {"model": "b", "parameters": {"weight": 0.4}}]}
    merged = {}
    for dtype in ("float32", "bfloat16"):
        run_merge(write(tmp_path, {**ties, "dtype": dtype}), tmp_path / dtype)
        merged[dtype] = load_file(tmp_path / dtype / "model.safetensors")
    assert all(merged["bfloat16"][n].dtype == torch.bfloat16 for n in merged["bfloat16"])
    assert all(torch.equal(merged["bfloat16"][n], merged["float32"][n].to(torch.bfloat16)) for n in merged["float32"])
    assert "computes in float32 and writes bfloat16" in caplog.text
    # Without a dtype, mergekit's default: the checkpoints' own.
    stored_in_bf16 = {**ties, "base_model": "base-bf16",
                      "models": [{**m, "model": f"{m['model']}-bf16"} for m in ties["models"]]}
    run_merge(write(tmp_path, stored_in_bf16), tmp_path / "own")
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "own" / "model.safetensors").values())


def test_exported_champions_say_why_mergekit_cannot_reproduce_them():
    della = ParameterSpaceRecipe(method="della", models=("a", "b"), base="base",
                                 groups=({"weight": [0.5, 0.5], "density": [0.4, 0.6]},))
    assert champion_as_mergekit(della, n_layers=2) == (None, "della with our papers' 1/p rescale: its keep probability, "
                                                       "hence 1/p, differs per entry; mergekit rescales by the L1 norm "
                                                       "or not at all")
    normalized = ParameterSpaceRecipe(method="dare_linear", models=("a", "b"), base="base", shared={"normalize": True},
                                      groups=({"weight": [0.5, 0.5], "density": [0.4, 0.6]},))
    config, note = champion_as_mergekit(normalized, n_layers=2)
    assert config is None and "normalizing" in note
    over_a_della_stage = DataFlowRecipe(models=(della, "a"), steps=((0, 0), (1, 1)))
    config, note = champion_as_mergekit(over_a_della_stage, n_layers=2)
    assert config is None and note.startswith("its merged stage (model 0 of the path) has no mergekit form: della")


def test_a_data_flow_champion_is_a_passthrough_of_runs_of_layers_scaled_after_crossings():
    path = DataFlowRecipe(models=("a", "b"), steps=((0, 0), (0, 1), (1, 1), (1, 2), (1, 2), (0, 3)),
                          crossing_scales={"0->1": 0.5, "1->0": 4.0})
    config, note = champion_as_mergekit(path, n_layers=4)
    scale = lambda factor: {"scale": [{"filter": "mlp.down_proj", "value": factor},  # noqa: E731
                                      {"filter": "self_attn.o_proj", "value": factor}]}
    assert config == {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 2]}]},
        {"sources": [{"model": "b", "layer_range": [1, 3], "parameters": scale(2.0)}]},
        {"sources": [{"model": "b", "layer_range": [2, 3], "parameters": scale(2.0)}]},
        {"sources": [{"model": "a", "layer_range": [3, 4], "parameters": scale(0.5)}]},
    ]}
    assert "crossing scales as passthrough scale" in note
