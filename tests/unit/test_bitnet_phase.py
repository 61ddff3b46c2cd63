"""The BitNet phase end to end on a micro model trained like the pipeline's: QAT against naive ternarization and
the float controls, report, packed extra file, checkpoint hand-off, bad input."""
import math

import pytest
import torch

from services.bitnet.__main__ import train_float_model
from services.bitnet.bitlinear import BitLinear
from services.bitnet.packed_model import load_packed
from services.bitnet.phase import PACKED_FILE, BitNetConfig, BitNetPhase
from services.bitnet.qat import quant_strength_at
from shared.checkpoint import load_checkpoint, save_checkpoint
from shared.evaluation import EvalSuite
from shared.models import Preset
from shared.phase import ForgedModel, get_phase

pytestmark = [pytest.mark.unit, pytest.mark.slow]  # a micro float model and one phase run: a few minutes

# The tiny preset's proportions (SwiGLU 3x wide, 4 heads), smaller: 2 layers of 64.
MICRO_SHAPE = Preset(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=192, vocab_size=512, max_positions=64)
MICRO = BitNetConfig(
    training={"steps": 30, "batch_size": 4, "warmup_steps": 1, "eval_every": 15, "learning_rate": 3e-3},
    seq_len=32,
    task_examples=200,
    train_text_chars=100_000,
    held_out_rows=16,
    calibration_rows=4,
    eval=EvalSuite(text_split="validation", split="validation",
                   tasks=(("multiple_choice", 1, 4), ("arithmetic", 1, 2)), max_new_tokens=3, max_length=32),
)


@pytest.fixture(scope="module")
def micro_model() -> ForgedModel:
    """A float model that learned something, so that ternarizing it does damage QAT has to repair."""
    return train_float_model(MICRO_SHAPE, MICRO, steps=150, name="micro")


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


def _mean_held_out_loss(measured: dict) -> float:
    return sum(measured["held_out_loss"].values()) / len(measured["held_out_loss"])


def test_qat_ends_far_below_naive_ternarization_and_its_gap_to_both_floats_is_reported(result):
    report = result.report
    naive, qat, control = (_mean_held_out_loss(report[m]) for m in ("naive_ternary", "qat", "float_finetuned"))
    # QAT repairs most of what ternarizing cost, measured against the float model trained just as long.
    assert naive - qat > 0.5 * (naive - control) > 0
    for reference in ("float", "float_finetuned"):
        gap = report["qat_gap"][reference]
        for key in ("text.bits_per_byte", "tasks.mean_accuracy", "multiple_choice.1.acc", "arithmetic.1.exact_match"):
            assert gap[key] == report["qat"][key] - report[reference][key]
        for source in ("text", "tasks"):
            assert gap[f"held_out_loss.{source}"] == (report["qat"]["held_out_loss"][source]
                                                      - report[reference]["held_out_loss"][source])
    # The control trained on the same batches under the same schedule as QAT.
    assert len(report["float_finetune_curve"]["train_loss"]) == len(report["qat_curve"]["train_loss"]) == 30
    assert report["float_finetune_curve"]["tokens"] == report["qat_curve"]["tokens"]
    assert report["float_finetuned"]["held_out_loss"] != report["float"]["held_out_loss"]


def test_float_control_is_optional(micro_model):
    quick = {"steps": 2, "batch_size": 2, "warmup_steps": 0, "eval_every": 2}
    config = MICRO.model_copy(update={"float_control": False, "training": MICRO.training.model_copy(update=quick),
                                      "eval": EvalSuite(text_split=None, tasks=(("multiple_choice", 1, 2),))})
    report = BitNetPhase().transform([micro_model], config).report
    assert "float_finetuned" not in report and "float_finetune_curve" not in report
    assert set(report["qat_gap"]) == {"float"}


def test_report_measures_four_models_and_both_packings(result):
    report = result.report
    for model in ("float", "float_finetuned", "naive_ternary", "qat"):
        assert math.isfinite(report[model]["text.bits_per_byte"]) and report[model]["text.bits_per_byte"] > 0
        assert set(report[model]["held_out_loss"]) == {"text", "tasks"}
        assert 0 <= report[model]["multiple_choice.1.acc"] <= 1
    # Different models give different numbers: nothing is copied from one entry to another.
    assert report["float"]["text.bits_per_byte"] != report["naive_ternary"]["text.bits_per_byte"]
    assert report["qat"]["held_out_loss"] != report["naive_ternary"]["held_out_loss"]
    curve = report["qat_curve"]
    assert len(curve["train_loss"]) == 30 and curve["eval_steps"] == [0, 15, 30]
    assert curve["lambda"] == [round(quant_strength_at(step, 15), 4) for step in range(30)]
    assert curve["lambda"][:3] == [0, 0.0667, 0.1333] and curve["lambda"][15:] == [1] * 15
    assert report["sizes"]["base3"]["ternary_bits_per_weight"] <= 1.6875
    assert report["summary"]["qat.test_bpb"] == round(report["qat"]["text.bits_per_byte"], 4)
    assert report["summary"]["ternary_bits_per_weight"] == round(
        report["sizes"][report["packing"]]["ternary_bits_per_weight"], 4)
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
