"""The baking phase end to end on a micro BitNet model: screening, baking with the anchor, the report's KL,
behaviour and scorecard sections, a ternary output whose fold and packed file are exact, the checkpoint
hand-off, and bad input refused before any work."""
import pytest

from services.baking.phase import ANCHOR, FAR_BELOW, BakingConfig, BakingPhase
from services.baking.prompts import TOOL_PROMPT
from shared.phase import get_phase
from shared.scorecard import ScorecardSpec
from tests.make_run import make_run_config
from tests.phase_checks import assert_hand_off_keeps_the_logits, assert_registered_after
from tests.scorecard_checks import assert_one_scorecard

pytestmark = [pytest.mark.unit, pytest.mark.slow]  # a micro BitNet model, sampling and a short bake

# Short prompts: the micro model's context is 64 tokens.
MICRO = BakingConfig(
    prompts=[{"name": "tools", "kind": "tools", "text": "use the calculator: ", "tasks": [["requests", 2]]},
             {"name": "persona", "kind": "persona", "text": "FORGE.\nFriend.\n", "traits": [{"name": "friend", "pattern": "friend"}]}],
    screen=False,  # a micro model follows no prompt; the screening is still measured and reported
    training={"steps": 8, "batch_size": 4, "warmup_steps": 1, "eval_every": 4, "learning_rate": 1e-2, "weight_decay": 0.0},
    sampling={"answer_tokens": 4, "speech_tokens": 8, "max_calls": 1},
    train_inputs=8, validation_inputs=6, test_inputs=6, anchor_inputs=4, excerpt_chars=60,
    scorecard=ScorecardSpec(split="validation", tasks=(("arithmetic", 1, 2), ("tool_calls", 2, 4)), max_new_tokens=3,
                            max_length=32),
)


@pytest.fixture(scope="module")
def result(micro_ternary):
    return BakingPhase().transform(micro_ternary.models, MICRO)


def test_phase_is_registered_and_in_the_default_pipeline_after_forge():
    assert isinstance(get_phase("baking"), BakingPhase)
    assert_registered_after("baking", "forge")


def test_the_report_measures_each_prompt_before_and_after_baking(result):
    report = result.report
    assert report["baked_prompts"] == ["tools", "persona"] and report["skipped_prompts"] == []
    assert set(report["screening"]) == {"tools", "persona"}
    assert set(report["screening"]["tools"]["prompted_against_unprompted"]) == {
        "requests.2.task_success", "requests.2.call_well_formed"}
    baking = report["baking"]
    assert set(baking["mix"]) == {"tools", "persona", f"{ANCHOR}.tasks", f"{ANCHOR}.text"}
    assert baking["trajectories"]["train"]["tools"] == MICRO.train_inputs
    losses = baking["curve"]["eval_loss"]["validation"]
    kept = baking["curve"]["eval_steps"].index(baking["curve"]["best_step"])
    assert losses[kept] == min(losses) and baking["fold"]["validation_kl_after_fold"] == pytest.approx(losses[kept], abs=1e-4)
    for name in ("tools", "persona"):
        test = report["test"][name]
        assert {"input", "prompted_input", "baked"} == set(test["means"])
        assert test["kl"]["teacher_to_input"] > 0 and test["kl"]["ratio"] == pytest.approx(
            test["kl"]["teacher_to_baked"] / test["kl"]["teacher_to_input"])
        assert all(d["n"] == MICRO.test_inputs for d in test["baked_against_input"].values())
    assert_one_scorecard(report)
    assert set(report["scorecard_cost"]["metrics"]) == set(report["against_input"]["headline"])


def test_the_output_is_ternary_folded_and_survives_the_checkpoint(result, tmp_path):
    (output,) = result.models
    ternary = result.report["ternary"]
    assert ternary["same_packed_size"] and ternary["packed_logits_max_abs_diff"] == 0.0
    assert not any("lora" in name for name in output.model.state_dict())
    assert_hand_off_keeps_the_logits(result, tmp_path, "baking")


def test_bad_input_is_refused_before_any_work(micro_ternary):
    phase = BakingPhase()
    with pytest.raises(ValueError, match="exactly one model"):
        phase.transform([*micro_ternary.models, *micro_ternary.models], MICRO)
    too_long = MICRO.model_copy(update={"prompts": (MICRO.prompts[0].model_copy(update={"text": "use the calculator: " * 12}),)})
    with pytest.raises(ValueError, match="more than the model's context of 64 tokens"):
        phase.transform(micro_ternary.models, too_long)


def test_on_the_tiny_pipeline_baking_the_instruction_moves_the_calls_into_the_weights(tiny_forged):
    """The checks on what `make run` bakes, for the tools prompt (the persona is bench/baking.py's: a tiny
    model follows it too little to bake): far lower held-out KL to the prompted input than the input's, and
    without any prompt more test requests answered with the calculator than the input, paired interval
    above zero; still ternary."""
    result = BakingPhase().transform(tiny_forged.models, make_run_config("baking", prompts=(TOOL_PROMPT,)))
    report = result.report
    assert report["baked_prompts"] == ["tools"]
    test = report["test"]["tools"]
    assert test["kl"]["far_below"] and test["kl"]["teacher_to_baked"] <= FAR_BELOW * test["kl"]["teacher_to_input"]
    success = test["baked_against_input"]["requests.2.task_success"]
    assert success["verdict"] == "better" and success["ci_low"] > 0
    assert report["ternary"]["same_packed_size"] and report["ternary"]["packed_logits_max_abs_diff"] == 0.0
    assert_one_scorecard(report)
    cost = report["scorecard_cost"]
    assert cost["within_tolerance"] == all(m["cost"] <= m["tolerance"] for m in cost["metrics"].values())
