"""Cognate on micro budgets: a base, three specialists and the multitask model sharing its tokenizer and
architecture, each with its curve, all on one scorecard; imports by name; clear errors. The full `tiny` run is the
slow test."""
from __future__ import annotations

import json

import pytest
import torch

from services.cognate.phase import MULTITASK, SPECIALITY, CognateConfig, CognatePhase, union_mix
from shared.checkpoint import save_checkpoint
from shared.phase import get_phase
from tests.scorecard_checks import assert_one_scorecard

MICRO = {"base_steps": 3, "specialist_steps": 2, "batch_size": 2, "warmup_steps": 1, "eval_every": 2,
         "task_examples": 300, "curve_rows": 2, "text_chars": 100_000,
         "scorecard": {"split": "validation", "tasks": [["arithmetic", 1, 4], ["tool_calls", 2, 4]],
                       "max_new_tokens": 4, "max_length": 64},
         "threads": 1}  # one thread: no OpenMP spin-waiting when the test shares busy cores


@pytest.fixture(scope="module")
def micro_result():
    phase = CognatePhase()
    return phase.transform([], phase.parse_config(MICRO))


@pytest.mark.unit
def test_phase_is_registered():
    assert isinstance(get_phase("cognate"), CognatePhase)


@pytest.mark.unit
def test_micro_run_gives_a_base_three_distinct_specialists_and_the_multitask_model(micro_result):
    names = [m.name for m in micro_result.models]
    assert names == ["base", "specialist-reasoning", "specialist-text", "specialist-tools", MULTITASK]
    base = micro_result.models[0]
    for specialist in micro_result.models[1:]:
        assert specialist.tokenizer is base.tokenizer
        assert not torch.equal(specialist.model.model.embed_tokens.weight, base.model.model.embed_tokens.weight)
    weights = [m.model.model.layers[0].mlp.up_proj.weight for m in micro_result.models[1:]]
    assert all(not torch.equal(a, b) for a, b in zip(weights, weights[1:]))


@pytest.mark.unit
def test_report_has_every_curve_and_is_json(micro_result):
    report = micro_result.report
    json.dumps(report)
    assert set(report["curves"]) == {"base", *SPECIALITY, MULTITASK}
    curve = report["curves"]["specialist-tools"]["curve"]
    assert len(curve["train_loss"]) == MICRO["specialist_steps"]
    assert set(curve["eval_loss"]) == {"text", "reasoning", "tools"}
    assert report["curves"]["specialist-tools"]["mix"]["tools"] == 0.7
    # The multitask baseline: the specialists' data pooled, for their total steps.
    multitask = report["curves"][MULTITASK]
    assert len(multitask["curve"]["train_loss"]) == 3 * MICRO["specialist_steps"]
    assert multitask["mix"] == union_mix(CognateConfig().specialists) == pytest.approx(
        {"text": 0.3, "reasoning": 0.4, "tools": 0.3})
    # Specialist seeds follow the phase's seed, so another pipeline seed trains another family.
    assert report["curves"]["specialist-text"]["training"]["seed"] == 12


@pytest.mark.unit
def test_report_scores_every_model_on_one_scorecard_with_the_baselines(micro_result):
    report = micro_result.report
    assert_one_scorecard(report)
    section = report["scorecard"]
    assert section["inputs"] == ["untrained"]
    assert section["outputs"] == [m.name for m in micro_result.models]
    assert section["baselines"] == ["untrained", "majority", MULTITASK]
    for name, won in report["speciality"].items():
        assert set(won["versus"]) == set(SPECIALITY) - {name}
        assert won["best_with_95pct_significance"] == all(v["verdict"] == "better" for v in won["versus"].values())
    assert report["summary"]["multitask.mean_task_success"] == round(
        section["cards"][MULTITASK]["metrics"]["tasks.mean_task_success"]["value"], 4)


@pytest.mark.unit
def test_imports_named_weights_instead_of_training(micro_result, tmp_path):
    paths = {}
    for forged in micro_result.models:
        save_checkpoint(forged, tmp_path / forged.name, phase="cognate", code_version="1", config={},
                        config_hash="", parents=[])
        paths[forged.name] = str(tmp_path / forged.name)
    phase = CognatePhase()
    result = phase.transform([], phase.parse_config({"import_paths": paths, "score": False}))
    assert [m.name for m in result.models] == list(paths)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(result.models[1].model(ids).logits, micro_result.models[1].model(ids).logits)


@pytest.mark.unit
def test_bad_configs_and_inputs_fail_clearly(micro_result):
    with pytest.raises(ValueError, match="import_paths must name"):
        CognateConfig(import_paths={"specialist-text": "/x"})
    with pytest.raises(ValueError, match="specialists must be exactly"):
        CognateConfig(specialists=CognateConfig().specialists[:2])
    with pytest.raises(ValueError, match="specialist-reasoning: unknown sources"):
        CognateConfig.model_validate({"specialists": [
            {**s.model_dump(), "mix": {"poetry": 1.0}} for s in CognateConfig().specialists]})
    with pytest.raises(ValueError, match="takes no input models"):
        CognatePhase().transform(micro_result.models, CognateConfig())


@pytest.mark.slow
def test_tiny_specialists_beat_the_untrained_model_and_win_their_speciality(tiny_cognate):
    """The checks on the default run (what `make run` trains): far better than untrained on held-out bits per
    byte, easy arithmetic's 95% interval above the majority answer, each best on its own speciality with
    every paired 95% interval excluding zero, and one scorecard for every model."""
    report = tiny_cognate.report
    assert_one_scorecard(report)
    cards = report["scorecard"]["cards"]
    majority = cards["majority"]["metrics"]["arithmetic.1.task_success"]["value"]
    for name in SPECIALITY:
        metrics = cards[name]["metrics"]
        assert metrics["text.bits_per_byte"]["ci_high"] < cards["untrained"]["metrics"]["text.bits_per_byte"]["ci_low"] - 1.0
        assert metrics["arithmetic.1.task_success"]["ci_low"] > majority
        assert report["speciality"][name]["best_with_95pct_significance"], report["speciality"][name]
        assert report["summary"][f"{name}.bpb"] == round(metrics["text.bits_per_byte"]["value"], 4)
    assert report["summary"]["each_specialist_best_on_its_speciality"] is True
