"""mergekit YAML read by `agentforge merge`: values at a tensor (gradients, filters), and every unsupported
field, method, parameter or model refused with an error that names it. Parity with mergekit on the same
files is in tests/integration/test_mergekit_parity.py."""
from __future__ import annotations

import pytest
import yaml

from services.evomerge.merge_methods import MergeConfigError, get_method
from services.evomerge.mergekit_yaml import MergekitRecipe, layer_position, read_config, run_merge, setting
from tests.unit.test_merge_methods import tiny_family

pytestmark = pytest.mark.unit


def test_gradients_interpolate_over_layers_and_filters_pick_by_tensor_name():
    assert layer_position("model.layers.3.mlp.up_proj.weight", 5) == 0.75
    assert layer_position("model.embed_tokens.weight", 5) == 0.0
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
    ({"merge_method": "ties", "models": [{"model": "a"}], "slices": []}, "slices"),
    ({"merge_method": "ties", "models": [{"model": "a"}], "out_dtype": "float16"}, "out_dtype"),
    ({"merge_method": "nearswap", "models": [{"model": "a"}]}, "nearswap"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"densty": 0.5}}]}, "densty"),
    ({"merge_method": "breadcrumbs", "base_model": "b", "models": [{"model": "a"}], "parameters": {"rescale": True}}, "rescale"),
    ({"merge_method": "linear", "base_model": "b", "models": [{"model": "a"}]}, "base_model"),
    ({"merge_method": "ties", "models": [{"model": "a"}], "dtype": "int4"}, "int4"),
    ({"merge_method": "passthrough", "models": [{"model": "a"}]}, "slices"),
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
    params = dare.method.resolve(dare.params_for(2)("model.layers.0.mlp.up_proj.weight"), 2)
    # mergekit's defaults, not our papers': L1 rescale for DARE (ours: 1/p), density 1 where a model gives none.
    assert params["rescale"] == "l1" and params["density"] == [0.5, 1.0] and params["normalize"] is False
    assert get_method("dare_ties").resolve({"weight": 1.0}, 2)["rescale"] == "paper"
