"""The shared scorecard: what a card holds, metrics that follow from its items, paired comparisons and the
Pareto relation, the majority baseline, and the sealed final split."""
from __future__ import annotations

import copy
import json
import threading

import pytest
import torch
from pydantic import ValidationError

from shared.comparison import BOOTSTRAP_SAMPLES, resample_indices
from shared.data.skills import skill_texts
from shared.data.splits import FinalSplitSealed, final_reader, unsealed_final
from shared.data.tasks import make_examples, training_stream
from shared.data.text import english_documents
from shared.models import Preset, build_model
from shared.scorecard import (
    MEAN_METRIC,
    TEXT_METRIC,
    ScorecardSpec,
    card_from_items,
    compare,
    headline_metrics,
    majority_card,
    metric_draws,
    pareto_relation,
    score,
    table_lines,
    text_blocks,
)
from shared.tokenizer import train_tokenizer

pytestmark = pytest.mark.unit

SPEC = ScorecardSpec(split="validation", tasks=(("arithmetic", 1, 12), ("tool_calls", 2, 10), ("multiple_choice", 2, 8)),
                     max_new_tokens=6, max_length=32)


@pytest.fixture(scope="module")
def tokenizer():
    texts = skill_texts("train", 200, 0, text_chars=50_000)
    return train_tokenizer([t for source in texts.values() for t in source], vocab_size=512, model_max_length=64)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.set_num_threads(1)
    shape = Preset(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, vocab_size=512, max_positions=64)
    return build_model(shape, len(tokenizer), 0, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def card(model, tokenizer):
    return score(model, tokenizer, SPEC)


def test_a_card_holds_every_metric_with_its_interval_and_the_items_behind_it(card):
    assert json.loads(json.dumps(card)) == card
    assert list(card["metrics"]) == [
        TEXT_METRIC, "arithmetic.1.task_success", "tool_calls.2.task_success", "tool_calls.2.call_well_formed",
        "multiple_choice.2.task_success", "reasoning.task_success", "tools.task_success", MEAN_METRIC]
    assert len(card["items"]["text"]["n_bytes"]) == len(text_blocks("validation")) > 10
    assert [len(card["items"][t]["task_success"]) for t in ("arithmetic.1", "tool_calls.2", "multiple_choice.2")] == [12, 10, 8]
    for name, metric in card["metrics"].items():
        assert metric["ci_low"] <= metric["value"] <= metric["ci_high"], name
    # Values follow from the items: nothing is computed elsewhere.
    flags = card["items"]["multiple_choice.2"]["task_success"]
    assert card["metrics"]["multiple_choice.2.task_success"]["value"] == sum(flags) / 8
    text = card["items"]["text"]
    assert card["metrics"][TEXT_METRIC]["value"] == pytest.approx(-sum(text["loglikelihood"]) / sum(text["n_bytes"]) / 0.6931471805599453)
    tasks = ("arithmetic.1", "tool_calls.2", "multiple_choice.2")
    assert card["metrics"][MEAN_METRIC]["value"] == pytest.approx(
        sum(sum(card["items"][t]["task_success"]) / len(card["items"][t]["task_success"]) for t in tasks) / 3)


def test_scoring_is_deterministic_and_leaves_the_model_as_it_was(model, tokenizer, card):
    model.train()
    assert score(model, tokenizer, SPEC) == card
    assert model.training
    model.eval()


def test_a_model_scored_again_in_one_process_gets_its_card_back_and_any_change_is_measured(model, tokenizer):
    def messages_of(scored_model, spec=SPEC) -> tuple[dict, list[str]]:
        messages = []
        return score(scored_model, tokenizer, spec, lambda fraction, message: messages.append(message)), messages

    card = score(model, tokenizer, SPEC)
    # The same weights in another object (a phase's input loaded from the step before's output): looked up.
    again, messages = messages_of(copy.deepcopy(model))
    assert again == card and again is not card and messages == ["scorecard: measured before in this process"]
    again["metrics"].clear()  # a caller's change to its copy does not reach the kept card
    assert messages_of(model)[0] == card
    # One weight moved by 1e-6, a module setting changed, or another spec: measured afresh.
    nudged = copy.deepcopy(model)
    with torch.no_grad():
        nudged.model.embed_tokens.weight[0, 0] += 1e-6
    measured, messages = messages_of(nudged)
    assert "scorecard: text" in messages and measured["items"]["text"] != card["items"]["text"]
    flagged = copy.deepcopy(model)
    flagged.model.layers[0].self_attn.scaling *= 2
    assert "scorecard: text" in messages_of(flagged)[1]
    assert "scorecard: text" in messages_of(model, SPEC.model_copy(update={"max_new_tokens": 5}))[1]


def _synthetic(flags: dict[str, list[int]], text: tuple[list[float], list[int]] | None = None) -> dict:
    """A card from hand-made items, through the same code as a scored one."""
    items = {task: {"task_success": values} for task, values in flags.items()}
    problems = {task: "same" for task in flags}
    if text is not None:
        items["text"] = {"loglikelihood": text[0], "n_bytes": text[1]}
        problems["text"] = "same"
    return card_from_items(SPEC, problems, items)


def test_a_card_compared_with_itself_is_indistinguishable(card):
    comparison = compare(card, card)
    assert comparison["relation"] == "indistinguishable"
    assert all(m["difference"] == 0 == m["ci_low"] == m["ci_high"] and m["verdict"] == "tied"
               for m in comparison["metrics"].values())
    assert comparison["headline"] == headline_metrics(list(card["metrics"]))
    assert TEXT_METRIC in comparison["headline"] and MEAN_METRIC not in comparison["headline"]


def test_paired_differences_and_the_pareto_relation():
    text = ([-100.0] * 20, [100] * 20)
    worse_text = ([-120.0] * 20, [100] * 20)
    strong = _synthetic({"arithmetic.1": [1] * 150 + [0] * 150, "tool_calls.2": [1] * 200 + [0] * 100}, text)
    weak = _synthetic({"arithmetic.1": [1] * 90 + [0] * 210, "tool_calls.2": [1] * 200 + [0] * 100}, text)
    comparison = compare(strong, weak)
    assert comparison["metrics"]["arithmetic.1.task_success"]["verdict"] == "better"
    assert comparison["metrics"]["arithmetic.1.task_success"]["difference"] == pytest.approx(0.2)
    assert comparison["metrics"]["tool_calls.2.task_success"]["verdict"] == "tied"
    assert comparison["relation"] == "dominates" and compare(weak, strong)["relation"] == "dominated"
    # Better at arithmetic, worse at text (more bits per byte): neither dominates.
    traded = _synthetic({"arithmetic.1": [1] * 150 + [0] * 150, "tool_calls.2": [1] * 200 + [0] * 100}, worse_text)
    assert compare(traded, weak)["metrics"][TEXT_METRIC]["verdict"] == "worse"
    assert compare(traded, weak)["relation"] == "incomparable"
    assert pareto_relation(["tied", "tied"]) == "indistinguishable"


def test_pairing_makes_a_small_shared_difference_significant():
    # Two models that agree on all but 8 of 300 problems: separately their intervals overlap widely, paired
    # the 8 wins are a clear difference.
    same = [i % 2 for i in range(292)]
    a, b = _synthetic({"arithmetic.1": [*same, *[1] * 8]}), _synthetic({"arithmetic.1": [*same, *[0] * 8]})
    assert a["metrics"]["arithmetic.1.task_success"]["ci_low"] < b["metrics"]["arithmetic.1.task_success"]["ci_high"]
    assert compare(a, b)["metrics"]["arithmetic.1.task_success"]["ci_low"] > 0
    # The resamples depend on the item set, never on the model.
    assert resample_indices("arithmetic.1", 300).shape == (BOOTSTRAP_SAMPLES, 300)
    assert (metric_draws(a, MEAN_METRIC)[1] - metric_draws(b, MEAN_METRIC)[1] >= 0).all()


def test_cards_of_different_problems_are_not_paired():
    a = _synthetic({"arithmetic.1": [1, 0]})
    b = _synthetic({"arithmetic.1": [1, 1]})
    b["problems"]["arithmetic.1"] = "other"
    with pytest.raises(ValueError, match="different problems"):
        compare(a, b)


def test_the_majority_baseline_gives_the_most_frequent_training_answer():
    spec = ScorecardSpec(split="test", text=False, tasks=(("modular", 1, 300), ("multiple_choice", 2, 50)))
    card = majority_card(spec)
    answers = [e.answer for e in make_examples("modular", 1, "train", 1000)]
    most = max(set(answers), key=answers.count)
    assert most == "0"  # a mod m is 0 for about one m in every value
    expected = sum(e.answer == most for e in make_examples("modular", 1, "test", 300)) / 300
    assert card["metrics"]["modular.1.task_success"]["value"] == expected > 0.1
    # A level whose training split holds fewer problems than the baseline asks for gives all it holds.
    small = majority_card(ScorecardSpec(split="test", text=False, tasks=(("multiple_choice", 1, 20),)))
    assert 0 <= small["metrics"]["multiple_choice.1.task_success"]["value"] <= 1
    assert TEXT_METRIC not in card["metrics"]
    lines = table_lines({"majority": card, "scored": _synthetic({"modular.1": [0] * 300}, ([-1.0], [1]))})
    assert lines[0].split()[:2] == ["model", "bits/byte"] and lines[1].split()[:2] == ["majority", "-"]


# --- the sealed final split ------------------------------------------------------------------------------


def test_the_final_split_is_refused_outside_the_final_report():
    with pytest.raises(FinalSplitSealed, match="final split is sealed"):
        make_examples("arithmetic", 1, "final", 5)
    with pytest.raises(FinalSplitSealed):
        next(training_stream({"arithmetic": 1.0}, [1], split="final"))
    with pytest.raises(FinalSplitSealed):
        english_documents("final")
    with pytest.raises(FinalSplitSealed):
        text_blocks("final")
    with pytest.raises(ValidationError, match="final split is sealed"):
        ScorecardSpec(split="final")
    with pytest.raises(ValidationError, match="held-out problems"):
        ScorecardSpec(split="train")


def test_a_phase_config_that_asks_for_the_final_split_is_refused():
    from shared.phase import get_phase

    for phase_name, key in (("cognate", "scorecard"), ("evomerge", "scorecard"), ("evomerge", "validation"),
                            ("bitnet", "scorecard")):
        with pytest.raises(ValidationError, match="final split is sealed"):
            get_phase(phase_name).parse_config({key: {"split": "final"}})


def test_the_final_report_unseals_the_final_split_for_its_own_context_only():
    with unsealed_final("the headline benchmark"):
        assert final_reader() == "the headline benchmark"
        assert len(make_examples("arithmetic", 1, "final", 5)) == 5
        assert ScorecardSpec(split="final").split == "final"
        blocks = text_blocks("final")
        seen_in_thread = []
        thread = threading.Thread(target=lambda: seen_in_thread.append(final_reader()))
        thread.start()
        thread.join()
        assert seen_in_thread == [None]  # another thread is not unsealed by this one
    assert final_reader() is None and blocks
    with pytest.raises(FinalSplitSealed):
        text_blocks("final")  # cached inside, still sealed outside
    with pytest.raises(ValueError, match="name of its reader"):
        with unsealed_final(" "):
            pass
