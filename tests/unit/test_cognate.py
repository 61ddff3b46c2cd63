"""Cognate on micro budgets: a base and three specialists that share its tokenizer and architecture, each
with its curve; imports by name; clear errors. The full `tiny` run with its measured table is the slow test."""
from __future__ import annotations

import json

import pytest
import torch

from services.cognate.phase import SPECIALITY, CognateConfig, CognatePhase
from shared.checkpoint import save_checkpoint
from shared.comparison import TextBlocks, bootstrap_accuracy_difference, bootstrap_bpb
from shared.phase import get_phase

MICRO = {"base_steps": 3, "specialist_steps": 2, "batch_size": 2, "warmup_steps": 1, "eval_every": 2,
         "task_examples": 300, "curve_rows": 2, "text_documents": 1, "score": False,
         "threads": 1}  # one thread: no OpenMP spin-waiting when the test shares busy cores


@pytest.fixture(scope="module")
def micro_result():
    phase = CognatePhase()
    return phase.transform([], phase.parse_config(MICRO))


@pytest.mark.unit
def test_phase_is_registered():
    assert isinstance(get_phase("cognate"), CognatePhase)


@pytest.mark.unit
def test_micro_run_gives_a_base_and_three_distinct_specialists(micro_result):
    names = [m.name for m in micro_result.models]
    assert names == ["base", "specialist-reasoning", "specialist-text", "specialist-tools"]
    base = micro_result.models[0]
    for specialist in micro_result.models[1:]:
        assert specialist.tokenizer is base.tokenizer
        assert not torch.equal(specialist.model.model.embed_tokens.weight, base.model.model.embed_tokens.weight)
    weights = [m.model.model.layers[0].mlp.up_proj.weight for m in micro_result.models[1:]]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])


@pytest.mark.unit
def test_report_has_every_curve_and_is_json(micro_result):
    report = micro_result.report
    json.dumps(report)
    assert set(report["curves"]) == {"base", *SPECIALITY}
    curve = report["curves"]["specialist-tools"]["curve"]
    assert len(curve["train_loss"]) == MICRO["specialist_steps"]
    assert set(curve["eval_loss"]) == {"text", "reasoning", "tools"}
    assert report["curves"]["specialist-tools"]["mix"]["tools"] == 0.7


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
    with pytest.raises(ValueError, match="unknown sources"):
        CognateConfig.model_validate({"specialists": [
            {**s.model_dump(), "mix": {"poetry": 1.0}} for s in CognateConfig().specialists]})
    with pytest.raises(ValueError, match="takes no input models"):
        CognatePhase().transform(micro_result.models, CognateConfig())


@pytest.mark.unit
def test_paired_bootstrap_of_bits_per_byte():
    a = TextBlocks(loglikelihood=[-100.0, -200.0, -150.0], n_bytes=[100, 150, 120])
    point, low, high = bootstrap_bpb(a)
    assert point == pytest.approx(450 / 370 / 0.6931471805599453)
    assert low <= point <= high
    assert bootstrap_bpb(a, a) == (0.0, 0.0, 0.0)


@pytest.mark.unit
def test_paired_bootstrap_of_exact_match():
    a, b = [True] * 30 + [False] * 70, [False] * 100
    assert bootstrap_accuracy_difference(a, a) == (0.0, 0.0, 0.0)
    difference, low, high = bootstrap_accuracy_difference(a, b)
    assert difference == pytest.approx(0.3) and 0.2 < low < 0.3 < high < 0.4
    # Agreeing on most problems makes a small difference significant when paired.
    same = [i % 2 == 0 for i in range(200)]
    assert bootstrap_accuracy_difference([*same, True, True, True, True, True, True], [*same, *[False] * 6])[1] > 0
    with pytest.raises(ValueError, match="same problems"):
        bootstrap_accuracy_difference(a, b[:10])


@pytest.mark.slow
def test_tiny_specialists_beat_the_untrained_model_and_win_their_speciality(tiny_cognate):
    """The issue's checks on the default run (what `make run` trains): far better than untrained on held-out
    bits per byte, easy arithmetic's 95% interval above the majority answer, each best on its own speciality
    with every paired 95% interval excluding zero."""
    report = tiny_cognate.report
    table = report["table"]
    for name in SPECIALITY:
        assert table[name]["text"]["block_ci_high"] < table["untrained"]["text"]["block_ci_low"] - 1.0
        assert table[name]["arithmetic_easy"]["ci_low"] > table["majority_baseline"]["arithmetic_easy"]
        assert report["speciality"][name]["best_with_95pct_significance"], report["speciality"][name]
        assert report["summary"][f"{name}.test_bpb"] == round(table[name]["text"]["bits_per_byte"], 4)
    assert report["summary"]["each_specialist_best_on_its_speciality"] is True
