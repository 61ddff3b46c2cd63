"""The BitNet phase end to end on a micro model trained like the pipeline's: QAT against naive ternarization and
the float controls, report, packed extra file, checkpoint hand-off, bad input."""
import math

import pytest
import torch

from services.bitnet.__main__ import train_float_model
from shared.ternary.bitlinear import BitLinear
from shared.ternary.packed_model import load_packed
from services.bitnet.phase import PACKED_FILE, BitNetConfig, BitNetPhase
from services.bitnet.qat import quant_strength_at
from shared.checkpoint import load_checkpoint, save_checkpoint
from shared.models import Preset
from shared.phase import ForgedModel, get_phase
from shared.scorecard import ScorecardSpec
from tests.scorecard_checks import assert_one_scorecard

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
    scorecard=ScorecardSpec(split="validation", tasks=(("multiple_choice", 1, 4), ("arithmetic", 1, 2), ("tool_calls", 2, 4)),
                            max_new_tokens=3, max_length=32),
)
SOURCES = {"text", "reasoning", "tools"}


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


def _mean_held_out_loss(losses: dict[str, float]) -> float:
    return sum(losses.values()) / len(losses)


def test_qat_ends_far_below_naive_ternarization_and_its_gap_to_both_floats_is_reported(result):
    report = result.report
    losses = report["held_out_loss"]
    naive, qat, control = (_mean_held_out_loss(losses[m]) for m in ("naive_ternary", "qat", "float_finetuned"))
    # QAT repairs most of what ternarizing cost, measured against the float model trained just as long.
    assert naive - qat > 0.5 * (naive - control) > 0
    cards = report["scorecard"]["cards"]
    for reference in ("float", "float_finetuned"):
        gap = report["qat_gap"][reference]
        for key in ("text.bits_per_byte", "tasks.mean_task_success", "multiple_choice.1.task_success",
                    "tool_calls.2.task_success"):
            assert gap["metrics"][key]["difference"] == pytest.approx(
                cards["qat"]["metrics"][key]["value"] - cards[reference]["metrics"][key]["value"])
        assert gap["relation"] in ("dominates", "dominated", "incomparable", "indistinguishable")
        for source in SOURCES:
            assert gap["held_out_loss"][source] == losses["qat"][source] - losses[reference][source]
    # The control trained on the same batches under the same schedule as QAT.
    assert len(report["float_finetune_curve"]["train_loss"]) == len(report["qat_curve"]["train_loss"]) == 30
    assert report["float_finetune_curve"]["tokens"] == report["qat_curve"]["tokens"]
    assert losses["float_finetuned"] != losses["float"]


def test_float_control_is_optional(micro_model):
    quick = {"steps": 2, "batch_size": 2, "warmup_steps": 0, "eval_every": 2}
    config = MICRO.model_copy(update={"float_control": False, "training": MICRO.training.model_copy(update=quick),
                                      "scorecard": ScorecardSpec(split="validation", text=False,
                                                                 tasks=(("multiple_choice", 1, 2),))})
    report = BitNetPhase().transform([micro_model], config).report
    assert "float_finetuned" not in report["scorecard"]["cards"] and "float_finetune_curve" not in report
    assert set(report["qat_gap"]) == {"float"}
    assert report["tool_use"] == {"measured": False, "reason": "the scorecard has no tool-call task"}


def test_report_measures_four_models_on_one_scorecard_and_both_packings(result):
    report = result.report
    assert_one_scorecard(report)
    assert report["scorecard"]["inputs"] == ["float"] and report["scorecard"]["outputs"] == ["qat"]
    cards = report["scorecard"]["cards"]
    assert list(cards) == ["float", "float_finetuned", "naive_ternary", "qat"]
    for model, card in cards.items():
        assert math.isfinite(card["metrics"]["text.bits_per_byte"]["value"]) and card["metrics"]["text.bits_per_byte"]["value"] > 0
        assert set(report["held_out_loss"][model]) == SOURCES  # trained on every skill, tool calls included
    # Different models give different numbers: nothing is copied from one entry to another.
    assert cards["float"]["items"]["text"] != cards["naive_ternary"]["items"]["text"]
    assert report["held_out_loss"]["qat"] != report["held_out_loss"]["naive_ternary"]
    tool_use = report["tool_use"]
    assert tool_use["input"] == cards["float"]["metrics"]["tools.task_success"]["value"]
    assert tool_use["kept"] == (tool_use["input"] - tool_use["output"] <= 0.10)
    curve = report["qat_curve"]
    assert len(curve["train_loss"]) == 30 and curve["eval_steps"] == [0, 15, 30]
    assert curve["lambda"] == [round(quant_strength_at(step, 15), 4) for step in range(30)]
    assert curve["lambda"][:3] == [0, 0.0667, 0.1333] and curve["lambda"][15:] == [1] * 15
    assert report["sizes"]["base3"]["ternary_bits_per_weight"] <= 1.6875
    assert report["summary"]["qat.bpb"] == round(cards["qat"]["metrics"]["text.bits_per_byte"]["value"], 4)
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


def test_the_tiny_champions_tool_use_survives_quantization(tiny_ternary):
    """The check on what `make run` quantizes: BitNet trains on every skill of its input, so the champion's
    tool-call success on the test split drops by at most 0.10 (the report states the loss either way)."""
    result = tiny_ternary
    assert_one_scorecard(result.report)
    assert result.report["tool_use"]["kept"], result.report["tool_use"]
