"""The ADAS phase end to end on a micro BitNet model: the objective measurement, experts and their curves,
the router, few-shot CEM, a front of evaluated non-dominated points, the report's held-out and own-family
comparisons, a ternary output folded exactly, and the experts file beside it in the checkpoint."""
import json

import pytest
from safetensors import safe_open

from services.adas.phase import EXPERTS_FILE, AdasConfig, AdasPhase
from services.adas.search import OBJECTIVES, pareto_front
from shared.phase import get_phase
from shared.scorecard import ScorecardSpec
from shared.ternary.packed_model import PACKED_FILE
from tests.phase_checks import assert_hand_off_keeps_the_logits, assert_registered_after
from tests.scorecard_checks import assert_one_scorecard

pytestmark = [pytest.mark.unit, pytest.mark.slow]  # a micro BitNet model, three short expert trainings, a search

MICRO = AdasConfig(
    families=[{"name": "arithmetic", "tasks": [["arithmetic", 1]]}, {"name": "sequence", "tasks": [["sequence", 1]]},
              {"name": "text", "text": True}],
    experts={"training": {"steps": 4, "batch_size": 4, "warmup_steps": 1, "eval_every": 2, "learning_rate": 1e-2,
                          "weight_decay": 0.0},
             "examples": 16, "text_chars": 4_000, "validation_examples": 8},
    seq_len=48, router_inputs=8, gradient_batch=4,
    cem={"population": 4, "generations": 1, "shots": 4},
    search={"population": 4, "generations": 2, "problems": 4, "text_blocks": 1},
    scorecard=ScorecardSpec(split="validation", tasks=(("arithmetic", 1, 4), ("sequence", 1, 4), ("modular", 1, 4)),
                            max_new_tokens=3, max_length=32),
)


@pytest.fixture(scope="module")
def result(micro_ternary):
    return AdasPhase().transform(micro_ternary.models, MICRO)


def test_phase_is_registered_and_in_the_default_pipeline_after_baking():
    assert isinstance(get_phase("adas"), AdasPhase)
    assert_registered_after("adas", "baking")


def test_the_report_measures_the_objective_and_trains_one_expert_per_family(result):
    report = result.report
    assert report["trainable_per_expert"] == report["sum_min_dimensions"] > 0
    agreement = report["objective"]["gradient_agreement"]
    assert agreement["text"] == {"applies": False, "why": "text has no task success to reward"}
    for name in ("arithmetic", "sequence"):
        assert -1 <= agreement[name]["reinforce_cosine"] <= 1 and -1 <= agreement[name]["likelihood_cosine"] <= 1
    for curve in report["experts"]["curves"].values():
        losses = curve["eval_loss"]["validation"]
        assert curve["best_step"] in curve["eval_steps"] and losses[curve["eval_steps"].index(curve["best_step"])] == min(losses)
    assert set(report["router"]["test_accuracy"]) == {"arithmetic", "sequence", "text"}
    assert sum(report["router"]["held_out_routed_to"].values()) == pytest.approx(1.0)
    few_shot = report["few_shot"]
    assert few_shot["task"] == "modular.1" and len(few_shot["alpha"]) == 3 and len(few_shot["generations"]) == 1


def test_every_point_on_the_front_was_evaluated_and_none_dominates_another(result):
    found = result.report["search"]
    points, front = found["points"], found["front"]
    assert found["objectives"] == list(OBJECTIVES) and len(points) <= 4 * 2
    assert all(set(p["objectives"]) == set(OBJECTIVES) for p in points)
    assert front == pareto_front(points) and found["chosen"] in front
    assert points[0]["groups"] == []  # the input was a candidate
    assert points[0]["objectives"]["bytes"] == min(p["objectives"]["bytes"] for p in points)


def test_the_report_compares_experts_the_held_out_task_and_the_whole_scorecard(result):
    report = result.report
    assert set(report["own_family"]) == {"arithmetic", "sequence", "text"}
    assert set(report["own_family"]["text"]) == {"text.bits_per_byte"}
    for comparisons in report["own_family"].values():
        assert all({"difference", "verdict", "value", "reference"} <= set(c) for c in comparisons.values())
    held_out = report["held_out"]
    assert held_out["task"] == "modular.1" and set(held_out["single_experts"]) == {"arithmetic", "sequence", "text"}
    assert set(held_out["against_best_single"]) == {"output", "few_shot", "routed"}
    assert_one_scorecard(report)
    cards = report["scorecard"]["cards"]
    assert {"input", "output", "routed", "expert.arithmetic", "expert.sequence", "expert.text"} == set(cards)
    assert set(report["summary"]["held_out"]) == {"output", "few_shot", "routed"}


def test_the_output_is_ternary_folded_and_carries_the_experts_file(result, tmp_path):
    (output,) = result.models
    ternary = result.report["ternary"]
    assert ternary["same_packed_size"] and ternary["packed_logits_max_abs_diff"] == 0.0
    assert not any("parametrizations" in name for name in output.model.state_dict())
    assert set(result.extra_files[output.name]) == {PACKED_FILE, EXPERTS_FILE}
    assert_hand_off_keeps_the_logits(result, tmp_path, "adas")
    with safe_open(tmp_path / EXPERTS_FILE, "pt") as experts:
        metadata = experts.metadata()
        assert json.loads(metadata["experts"]) == ["arithmetic", "sequence", "text"]
        layers = result.report["adapted_layers"]
        keys = set(experts.keys())
        assert {f"expert.{name}.{layer}" for name in ("arithmetic", "sequence", "text") for layer in layers} <= keys
        assert {f"{layer}.{part}" for layer in layers for part in ("U", "S", "Vh")} <= keys
        assert {"router.weight", "router.bias"} <= keys


def test_a_model_that_is_not_ternary_is_refused(micro_ternary):
    from shared.models import build_model
    from shared.phase import ForgedModel

    tokenizer = micro_ternary.models[0].tokenizer
    float_model = build_model("tiny", len(tokenizer), 0, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="ternary|BitNet"):
        AdasPhase().transform([ForgedModel(float_model, tokenizer, "float")], MICRO)
