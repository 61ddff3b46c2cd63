"""Checks every phase after BitNet must pass: its place in the default pipeline, and a hand-off through the
checkpoint that keeps the model's logits (the latent weights reloaded, and the packed ternary file)."""
from __future__ import annotations

from pathlib import Path

import torch

from shared.checkpoint import load_checkpoint, save_checkpoint
from shared.phase import PhaseResult, get_phase
from shared.ternary.bitlinear import trainable_ternary
from shared.ternary.packed_model import PACKED_FILE, load_packed


def assert_registered_after(phase: str, previous: str) -> None:
    from shared.fabric.cli import default_spec

    assert get_phase(phase).name == phase
    names = [step.phase for step in default_spec().steps]
    assert names.index(phase) == names.index(previous) + 1


def assert_hand_off_keeps_the_logits(result: PhaseResult, directory: Path, phase: str) -> None:
    """Save the phase's one output with its extra files, reload it, and compare logits on a fixed batch.

    The next phase takes the reloaded latent weights as BitLinear layers (trainable_ternary) and the packed
    file holds the trits: both must give the output's logits exactly. Stock transformers' BitNet layers
    compute the same ternary model in another order (x W_q / s against x (W_q / s)): a 1e-6 difference can
    move an 8-bit activation across a rounding step, so that path is held to agreeing predictions instead."""
    (output,) = result.models
    save_checkpoint(output, directory, phase=phase, code_version="1", config={}, config_hash="x", parents=[],
                    extra_files=result.extra_files[output.name])
    loaded, _ = load_checkpoint(directory)
    batch = torch.randint(0, len(output.tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = output.model(batch).logits
        assert torch.equal(trainable_ternary(loaded.model).eval()(batch).logits, expected)
        assert torch.equal(load_packed(directory / PACKED_FILE)(batch).logits, expected)
        stock = loaded.model(batch).logits
        assert (stock.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
        assert (stock - expected).abs().max() <= 0.05
