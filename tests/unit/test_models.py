"""Presets, seeded construction, and importing local weights (safetensors only)."""
from __future__ import annotations

import pytest
import torch

from shared.models import (
    PRESETS, WeightsImportError, build_model, count_parameters, get_preset, import_gguf, import_hf_folder, import_weights,
)
from shared.tokenizer import train_tokenizer

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["the cat sat on the mat", "1 + 2 = 3\n"] * 50, 512, 64)


def test_presets_have_their_documented_sizes():
    assert 0.9e6 < count_parameters(build_model("tiny", PRESETS["tiny"].vocab_size, 0)) < 1.3e6
    assert 22e6 < count_parameters(build_model("small", PRESETS["small"].vocab_size, 0)) < 28e6


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match="tiny, small"):
        get_preset("huge")


def test_same_seed_same_weights_and_the_caller_rng_is_untouched():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = (build_model("tiny", 512, seed) for seed in (1, 1, 2))
    assert torch.equal(torch.rand(1), expected_next)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_model_is_a_standard_llama_with_tied_embeddings(tokenizer):
    model = build_model("tiny", len(tokenizer), 0, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    assert model.config.model_type == "llama"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.pad_token_id == tokenizer.pad_token_id


def _save(model, tokenizer, folder):
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def test_hf_folder_import_gives_identical_logits(tokenizer, tmp_path):
    model = build_model("tiny", len(tokenizer), 3).eval()
    _save(model, tokenizer, tmp_path)
    imported = import_weights(tmp_path, "specialist-text")
    ids = torch.tensor([tokenizer("the cat sat")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(imported.model(ids).logits, model(ids).logits)
    assert imported.name == "specialist-text"
    assert imported.tokenizer.get_vocab() == tokenizer.get_vocab()


def test_pickle_weights_are_refused(tokenizer, tmp_path):
    _save(build_model("tiny", len(tokenizer), 3), tokenizer, tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(WeightsImportError, match="only safetensors"):
        import_hf_folder(tmp_path)


def test_folder_without_config_or_weights_is_refused(tokenizer, tmp_path):
    with pytest.raises(WeightsImportError, match="no config.json"):
        import_hf_folder(tmp_path)
    build_model("tiny", len(tokenizer), 3).config.save_pretrained(tmp_path)
    with pytest.raises(WeightsImportError, match="no \\*.safetensors"):
        import_hf_folder(tmp_path)


def test_gguf_import_needs_a_gguf_file(tmp_path):
    with pytest.raises(WeightsImportError, match="not a .gguf file"):
        import_gguf(tmp_path / "missing.gguf")
