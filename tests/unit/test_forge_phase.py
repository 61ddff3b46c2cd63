"""The Forge phase end to end on a micro BitNet model: ternary in, ternary out of the same packed size and
logits, the ablation runs and curves in the report, the checkpoint hand-off from BitNet, bad input; and the
check on what `make run` forges."""
import pytest
import torch

from services.forge.phase import MECHANISMS, ForgeConfig, ForgePhase, ablation_variants
from shared.checkpoint import load_checkpoint, save_checkpoint
from shared.phase import get_phase
from shared.scorecard import ScorecardSpec
from shared.ternary.bitlinear import BitLinear
from tests.make_run import make_run_config
from tests.phase_checks import assert_hand_off_keeps_the_logits, assert_registered_after
from tests.scorecard_checks import assert_one_scorecard
from tests.unit.test_bitnet_phase import MICRO as MICRO_BITNET
from tests.unit.test_bitnet_phase import MICRO_SHAPE

pytestmark = [pytest.mark.unit, pytest.mark.slow]  # a micro BitNet model and six short training runs

MICRO = ForgeConfig(
    training={"steps": 24, "batch_size": 4, "warmup_steps": 1, "eval_every": 12, "learning_rate": 3e-3,
              "grokfast": {"enabled": True}},
    curriculum={"window": 8, "check_every": 6},
    self_model={"warmup_steps": 6},
    dream={"every": 6, "per_round": 2, "length": 12},
    seq_len=32, task_examples=200, train_text_chars=100_000, held_out_rows=8,
    scorecard=ScorecardSpec(split="validation", tasks=(("multiple_choice", 1, 4), ("arithmetic", 1, 2), ("tool_calls", 2, 4)),
                            max_new_tokens=3, max_length=32),
)


@pytest.fixture(scope="module")
def result(micro_ternary):
    return ForgePhase().transform(micro_ternary.models, MICRO)


def test_phase_is_registered_and_in_the_default_pipeline_after_bitnet():
    assert isinstance(get_phase("forge"), ForgePhase)
    assert_registered_after("forge", "bitnet")
    with pytest.raises(ValueError):
        ForgePhase().parse_config({"no_such_key": 1})


def test_output_is_still_ternary_with_the_packed_size_and_logits_of_the_checkpoint(micro_ternary, result, tmp_path):
    (output,) = result.models
    ternary = result.report["ternary"]
    assert ternary["same_packed_size"] and ternary["input_packed_bytes"] == ternary["output_packed_bytes"]
    assert ternary["packed_logits_max_abs_diff"] == 0.0
    assert all(isinstance(output.model.get_submodule(name), BitLinear)
               for name, m in micro_ternary.models[0].model.named_modules() if isinstance(m, BitLinear))
    assert_hand_off_keeps_the_logits(result, tmp_path, "forge")
    before = {k: v.clone() for k, v in micro_ternary.models[0].model.state_dict().items()}
    assert any(not torch.equal(before[k], v) for k, v in output.model.state_dict().items())  # it trained
    assert all(torch.equal(before[k], v) for k, v in micro_ternary.models[0].model.state_dict().items())


def test_report_holds_the_ablation_runs_their_curves_and_the_curriculum_trace(result):
    report = result.report
    assert_one_scorecard(report)
    expected_runs = ["forge", *(f"no_{name}" for name in MECHANISMS), "all_off"]
    assert list(report["runs"]) == expected_runs
    assert set(report["ablation"]) == set(expected_runs) - {"forge"}
    for margins in report["ablation"].values():
        assert margins["relation"] in ("dominates", "dominated", "incomparable", "indistinguishable")
    forge = report["runs"]["forge"]
    assert len(forge["curve"]["train_loss"]) == MICRO.training.steps
    assert forge["curve"]["eval_steps"] == [0, 12, 24]
    assert len(forge["curriculum"]["level_per_step"]) == MICRO.training.steps
    assert [m["step"] for m in forge["curriculum"]["measurements"]] == [6, 12, 18, 24]
    assert forge["rows_fed"]["dream"] > 0 and "self_model_mse" in forge["curve"]["logged"]
    assert "curriculum" not in report["runs"]["no_curriculum"] and "replay" not in report["runs"]["no_dream"]
    assert report["runs"]["all_off"]["switches"] == dict.fromkeys(MECHANISMS, False)
    assert report["summary"]["beats_input"] == (report["against_input"]["relation"] == "dominates")


def test_ablation_variants_turn_off_only_what_is_on():
    assert ablation_variants({"grokfast": True, "curriculum": False, "self_model": True, "dream": False}) == {
        "no_grokfast": {"grokfast": False, "curriculum": False, "self_model": True, "dream": False},
        "no_self_model": {"grokfast": True, "curriculum": False, "self_model": False, "dream": False},
        "all_off": {"grokfast": False, "curriculum": False, "self_model": False, "dream": False},
    }


def test_bitnets_checkpoint_is_taken_as_saved(micro_ternary, tmp_path):
    """In the services, Forge receives BitNet's checkpoint, rebuilt by transformers as AutoBitLinear layers."""
    (ternary,) = micro_ternary.models
    save_checkpoint(ternary, tmp_path, phase="bitnet", code_version="1", config={}, config_hash="x", parents=[])
    loaded, _ = load_checkpoint(tmp_path)
    assert type(loaded.model.model.layers[0].self_attn.q_proj).__name__ == "AutoBitLinear"
    quick = MICRO.model_copy(update={"ablations": False, "training": MICRO.training.model_copy(update={"steps": 6})})
    result = ForgePhase().transform([loaded], quick)
    assert list(result.report["runs"]) == ["forge"] and result.report["ternary"]["same_packed_size"]


def test_bad_input_is_refused(micro_ternary):
    from services.bitnet.__main__ import train_float_model as float_model

    phase = ForgePhase()
    with pytest.raises(ValueError, match="exactly one model"):
        phase.transform([*micro_ternary.models, *micro_ternary.models], MICRO)
    with pytest.raises(ValueError, match="not a BitNet model"):
        phase.transform([float_model(MICRO_SHAPE, MICRO_BITNET, steps=21, name="float")], MICRO)


def test_on_the_tiny_pipeline_forge_keeps_the_model_ternary_and_says_whether_it_beats_its_input(tiny_forged):
    """The check on what `make run` forges (without the ablation runs, which bench/forge.py makes): the output
    is ternary at the input's packed size, and the report's verdict against the input follows its margins."""
    config, report = make_run_config("forge"), tiny_forged.report
    assert_one_scorecard(report)
    assert report["ternary"]["same_packed_size"] and report["ternary"]["packed_logits_max_abs_diff"] == 0.0
    margins = report["against_input"]
    verdicts = [margins["metrics"][m]["verdict"] for m in margins["headline"]]
    assert report["summary"]["beats_input"] == ("worse" not in verdicts and "better" in verdicts)
    measurements = report["runs"]["forge"]["curriculum"]["measurements"]
    assert len(measurements) == config.training.steps // config.curriculum.check_every
