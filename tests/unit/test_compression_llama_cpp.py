"""llama.cpp runs the exported GGUFs of ternary models: its next-token logits on test text agree with ours (top-1
at least 97%, bits per byte within 2%). The tiny pipeline's model (rows of 128 and 384: Q4_0 with block scale 1)
and a micro model of hidden size 256 whose rows (256 and 512) fit llama.cpp's ternary types TQ2_0 and TQ1_0.
llama-cpp-python is built from PyPI on first use (about 20 minutes on 2 cores, then cached by uv); the tests
skip, saying why, if it cannot be built."""
import pytest

from services.compression.gguf_export import export_gguf
from services.compression.llama_cpp_check import agreement, install_llama_cpp, llama_cpp_available
from shared.models import Preset
from shared.scorecard import text_blocks
from shared.ternary.bitlinear import convert_to_bitnet, trainable_ternary

pytestmark = [pytest.mark.unit, pytest.mark.slow]
BUILD_TIMEOUT_S = 45 * 60
# The micro proportions of test_bitnet_phase (SwiGLU 2x here, so that the down projection's rows are 512 long),
# at hidden size 256: every ternary row a multiple of llama.cpp's 256-weight blocks.
TERNARY_256 = Preset(hidden_size=256, num_layers=2, num_heads=4, intermediate_size=512, vocab_size=512, max_positions=128)


@pytest.fixture(scope="module")
def llama_cpp():
    if llama_cpp_available() and (why := install_llama_cpp(BUILD_TIMEOUT_S)):
        pytest.skip(f"llama.cpp is not available: {why}")


@pytest.fixture(scope="module")
def ternary_256():
    """A float model of TERNARY_256 trained 150 steps on the skills mix (train_float_model, as BitNet's tests
    train theirs), then converted to BitNet's ternary layers; the phase's QAT is not needed to compare runtimes."""
    from services.bitnet.__main__ import train_float_model
    from tests.unit.test_bitnet_phase import MICRO as MICRO_BITNET

    forged = train_float_model(TERNARY_256, MICRO_BITNET, steps=150, name="micro-256")
    convert_to_bitnet(forged.model)
    return forged


def _check_agreement(forged, path, texts: int) -> None:
    model = trainable_ternary(forged.model).eval()
    measured = agreement(path, model, forged.tokenizer, list(text_blocks("test")[:texts]), model.config.max_position_embeddings)
    assert measured["positions"] >= 1000
    assert measured["top1_agreement"] >= 0.97, measured
    assert abs(measured["bits_per_byte_relative_difference"]) <= 0.02, measured


@pytest.mark.parametrize("ternary", [True, False], ids=["ternary", "f16"])
def test_llama_cpp_reproduces_our_next_token_predictions(llama_cpp, tiny_ternary, tmp_path, ternary):
    forged = tiny_ternary.models[0]
    path = tmp_path / "model.gguf"
    info = export_gguf(trainable_ternary(forged.model).eval(), forged.tokenizer, path, ternary=ternary)
    assert set(info["matrix_types"].values()) == ({"Q4_0"} if ternary else {"F16"})  # tiny's rows: 128 and 384
    _check_agreement(forged, path, 8)


@pytest.mark.parametrize("ternary_type", ["TQ2_0", "TQ1_0"])
def test_llama_cpp_runs_the_ternary_types_on_rows_of_256(llama_cpp, ternary_256, tmp_path, ternary_type):
    path = tmp_path / "model.gguf"
    info = export_gguf(trainable_ternary(ternary_256.model).eval(), ternary_256.tokenizer, path, ternary_type=ternary_type)
    assert set(info["matrix_types"].values()) == {ternary_type}
    _check_agreement(ternary_256, path, 8)  # 8 texts of up to 128 tokens
