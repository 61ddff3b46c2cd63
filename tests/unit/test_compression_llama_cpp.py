"""llama.cpp runs the exported GGUF of the tiny pipeline's ternary model: its next-token logits on test text
agree with ours (top-1 at least 97%, bits per byte within 2%). llama-cpp-python is built from PyPI on first
use (about 20 minutes on 2 cores, then cached by uv); the test skips, saying why, if it cannot be built."""
import pytest

from services.compression.gguf_export import export_gguf
from services.compression.llama_cpp_check import agreement, install_llama_cpp, llama_cpp_available
from shared.scorecard import text_blocks
from shared.ternary.bitlinear import trainable_ternary

pytestmark = [pytest.mark.unit, pytest.mark.slow]
BUILD_TIMEOUT_S = 45 * 60


@pytest.fixture(scope="module")
def llama_cpp():
    if llama_cpp_available() and (why := install_llama_cpp(BUILD_TIMEOUT_S)):
        pytest.skip(f"llama.cpp is not available: {why}")


@pytest.mark.parametrize("ternary", [True, False], ids=["ternary", "f16"])
def test_llama_cpp_reproduces_our_next_token_predictions(llama_cpp, tiny_ternary, tmp_path, ternary):
    forged = tiny_ternary.models[0]
    model = trainable_ternary(forged.model).eval()
    path = tmp_path / "model.gguf"
    info = export_gguf(model, forged.tokenizer, path, ternary=ternary)
    assert set(info["matrix_types"].values()) == ({"Q4_0"} if ternary else {"F16"})  # tiny's rows: 128 and 384
    measured = agreement(path, model, forged.tokenizer, list(text_blocks("test")[:8]), model.config.max_position_embeddings)
    assert measured["positions"] >= 1000
    assert measured["top1_agreement"] >= 0.97, measured
    assert abs(measured["bits_per_byte_relative_difference"]) <= 0.02, measured
