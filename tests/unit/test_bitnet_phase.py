"""The BitNet phase end to end on a micro model: report, packed extra file, checkpoint hand-off, bad input."""
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from services.bitnet.bitlinear import BitLinear
from services.bitnet.packed_model import load_packed
from services.bitnet.phase import PACKED_FILE, BitNetConfig, BitNetPhase
from services.bitnet.qat import quant_strength_at
from shared.checkpoint import load_checkpoint, save_checkpoint
from shared.data.text import english_documents
from shared.evaluation import EvalSuite
from shared.phase import ForgedModel, get_phase
from shared.tokenizer import train_tokenizer

pytestmark = [pytest.mark.unit, pytest.mark.slow]  # one micro run of the phase: about a minute

MICRO = BitNetConfig(
    training={"steps": 6, "batch_size": 4, "warmup_steps": 1, "eval_every": 3, "learning_rate": 3e-3},
    seq_len=32,
    task_examples=40,
    train_text_chars=20_000,
    held_out_rows=4,
    calibration_rows=4,
    eval=EvalSuite(text_split="validation", split="validation",
                   tasks=(("multiple_choice", 1, 4), ("arithmetic", 1, 2)), max_new_tokens=3, max_length=32),
)


@pytest.fixture(scope="module")
def micro_model() -> ForgedModel:
    tokenizer = train_tokenizer([english_documents("validation")[0][:20_000]], vocab_size=512, model_max_length=64)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    return ForgedModel(model=LlamaForCausalLM(config).eval(), tokenizer=tokenizer, name="micro")


@pytest.fixture(scope="module")
def result(micro_model):
    return BitNetPhase().transform([micro_model], MICRO)


def test_phase_is_registered_and_rejects_unknown_config_keys():
    phase = get_phase("bitnet")
    assert isinstance(phase, BitNetPhase)
    with pytest.raises(ValueError):
        phase.parse_config({"learning_rate": 1.0})


def test_output_is_ternary_and_the_input_untouched(micro_model, result):
    (output,) = result.models
    layers = [m for m in output.model.modules() if isinstance(m, BitLinear)]
    assert len(layers) == 14 and all(layer.quant_strength == 1.0 for layer in layers)
    assert not any(isinstance(m, BitLinear) for m in micro_model.model.modules())
    assert not getattr(micro_model.model.config, "quantization_config", None)


def test_report_measures_three_models_and_both_packings(result):
    report = result.report
    for model in ("float", "naive_ternary", "qat"):
        assert math.isfinite(report[model]["text.bits_per_byte"]) and report[model]["text.bits_per_byte"] > 0
        assert set(report[model]["held_out_loss"]) == {"text", "tasks"}
        assert 0 <= report[model]["multiple_choice.1.acc"] <= 1
    # Different models give different numbers: nothing is copied from one entry to another.
    assert report["float"]["text.bits_per_byte"] != report["naive_ternary"]["text.bits_per_byte"]
    assert report["qat"]["held_out_loss"] != report["naive_ternary"]["held_out_loss"]
    curve = report["qat_curve"]
    assert len(curve["train_loss"]) == 6 and curve["eval_steps"] == [0, 3, 6]
    assert curve["lambda"] == [round(quant_strength_at(step, 3), 4) for step in range(6)]
    assert curve["lambda"] == [0, 0.3333, 0.6667, 1, 1, 1]
    assert report["sizes"]["base3"]["ternary_bits_per_weight"] <= 1.6875
    weights = [m.weight.numel() for m in result.models[0].model.modules() if isinstance(m, BitLinear)]
    assert report["sizes"]["2bit"]["ternary_payload_bytes"] == sum(math.ceil(n / 4) for n in weights)
    assert report["sizes"]["base3"]["ternary_payload_bytes"] == sum(math.ceil(n / 5) for n in weights)


def test_packed_extra_file_and_checkpoint_hand_off_give_the_same_logits(result, tmp_path, eager_torch):
    (output,) = result.models
    files = result.extra_files["micro"]
    save_checkpoint(output, tmp_path, phase="bitnet", code_version="1", config={}, config_hash="x", parents=[],
                    extra_files=files)
    batch = torch.randint(0, len(output.tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = output.model(batch).logits
        assert torch.equal(load_packed(tmp_path / PACKED_FILE)(batch).logits, expected)
        reloaded, _ = load_checkpoint(tmp_path)
        assert type(reloaded.model.model.layers[0].self_attn.q_proj).__name__ == "AutoBitLinear"
        assert torch.equal(reloaded.model(batch).logits, expected)


def test_bad_input_is_refused(micro_model, result):
    phase = BitNetPhase()
    with pytest.raises(ValueError, match="exactly one model"):
        phase.transform([micro_model, micro_model], MICRO)
    with pytest.raises(ValueError, match="already quantized"):
        phase.transform(result.models, MICRO)
