"""Checkpoints round-trip exactly, refuse tampering and pickles, and name their content by digest."""
from __future__ import annotations

import pytest
import torch

from shared.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, verify_checkpoint
from shared.models import build_model
from shared.phase import ForgedModel
from shared.tokenizer import train_tokenizer
from shared.training import TrainingConfig, encode_texts, train_causal_lm

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["to be or not to be", "3 + 4 = 7\n"] * 50, 512, 32)


def _forged(tokenizer, seed: int = 0, train_seed: int | None = None) -> ForgedModel:
    model = build_model("tiny", len(tokenizer), seed, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if train_seed is not None:
        rows = encode_texts(tokenizer, [f"{a} + {b} = {a + b}\n" for a in range(10) for b in range(10)], 32)
        config = TrainingConfig(steps=4, batch_size=2, warmup_steps=1, seed=train_seed, threads=1)
        train_causal_lm(model, {"all": rows}, {"all": 1.0}, config, pad_id=tokenizer.pad_token_id)
    return ForgedModel(model.eval(), tokenizer, "specialist-text")


def _save(forged, folder):
    return save_checkpoint(forged, folder, phase="cognate", code_version="1", config={"seed": 0},
                           config_hash="h", parents=[], metrics={"loss": 1.0})


def test_save_then_load_gives_identical_logits(tokenizer, tmp_path):
    forged = _forged(tokenizer)
    manifest = _save(forged, tmp_path)
    loaded, loaded_manifest = load_checkpoint(tmp_path)
    ids = torch.tensor([tokenizer("to be or not")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, forged.model(ids).logits)
    assert loaded.name == "specialist-text" and loaded_manifest.digest == manifest.digest
    assert loaded.tokenizer.get_vocab() == tokenizer.get_vocab()


def test_carried_files_travel_with_the_model_and_are_checked(tokenizer, tmp_path):
    forged = _forged(tokenizer)
    forged.carried = {"head.safetensors": b"\x00head bytes"}
    manifest = _save(forged, tmp_path)
    assert "carried/head.safetensors" in manifest.files
    loaded, _ = load_checkpoint(tmp_path)
    assert loaded.carried == forged.carried
    (tmp_path / "carried" / "head.safetensors").write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match="carried/head.safetensors"):
        load_checkpoint(tmp_path)


def test_a_tampered_weight_file_is_refused(tokenizer, tmp_path):
    _save(_forged(tokenizer), tmp_path)
    weights = tmp_path / "model.safetensors"
    payload = bytearray(weights.read_bytes())
    payload[-1] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(payload))
    with pytest.raises(CheckpointError, match="model.safetensors: SHA-256"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("pickle_name", ["pytorch_model.bin", "optimizer.pt"])
def test_a_pickle_file_is_refused(tokenizer, tmp_path, pickle_name):
    _save(_forged(tokenizer), tmp_path)
    (tmp_path / pickle_name).write_bytes(b"\x80\x04pickle")
    with pytest.raises(CheckpointError, match="only safetensors"):
        verify_checkpoint(tmp_path)


def test_same_seed_and_data_give_the_same_weights_and_digest(tokenizer, tmp_path):
    a = _save(_forged(tokenizer, train_seed=5), tmp_path / "a")
    b = _save(_forged(tokenizer, train_seed=5), tmp_path / "b")
    c = _save(_forged(tokenizer, train_seed=6), tmp_path / "c")
    assert a.files["model.safetensors"] == b.files["model.safetensors"] and a.digest == b.digest
    assert c.files["model.safetensors"] != a.files["model.safetensors"]
