"""EvoMergePhase end to end on tiny models (random weights, a real tokenizer, the real scorecard): the report's
structure, the split discipline, the baselines, recipe re-application, and clear errors on bad inputs."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from services.evomerge.phase import (
    DEFAULT_VALIDATION,
    EvoMergeConfig,
    EvoMergePhase,
    champion_margins,
    fitness_of,
    margin_interval,
    seed_label,
)
from services.evomerge.recipe import apply_recipe, weights_of
from services.evomerge.search import seed_recipes, specialist_alone
from shared.checkpoint import save_checkpoint
from shared.phase import ForgedModel, get_phase
from shared.scorecard import LOG2, ScorecardSpec, card_from_items, values
from shared.tokenizer import train_tokenizer
from shared.training import TrainingConfig
from tests.scorecard_checks import assert_one_scorecard
from tests.unit.test_merge_methods import tiny_config, tiny_family

pytestmark = pytest.mark.unit

# No bits per byte here: rolling windows over two plays cost minutes on a loaded 2-core machine.
SUITE = {"split": "validation", "text": False, "tasks": [["multiple_choice", 1, 4]]}
TEST_SUITE = {"split": "test", "text": False, "tasks": [["multiple_choice", 1, 6]]}
SMALL = {"generations": 1, "population": 2, "dfs_generations": 1, "dfs_population": 2,
         "seed_methods": ["linear", "ties"], "validation": SUITE, "scorecard": TEST_SUITE}


@pytest.fixture(scope="module")
def inputs() -> list[ForgedModel]:
    words = ["the merge of three models", "what is 3 + 4 ? 7", "to be or not to be", "a b c d e f g"] * 50
    tokenizer = train_tokenizer(words, 512, 64)
    base, finetunes = tiny_family(4, vocab_size=len(tokenizer))
    models = [base, *finetunes]
    names = ["base", "specialist-a", "specialist-b", "specialist-c", "multitask"]
    return [ForgedModel(m.eval(), tokenizer, n) for m, n in zip(models, names)]


def test_phase_is_registered():
    assert isinstance(get_phase("evomerge"), EvoMergePhase)


def test_config_rejects_the_test_split_and_unknown_methods():
    with pytest.raises(ValueError, match="search scores on the validation split"):
        EvoMergeConfig.model_validate({"validation": {"split": "test"}})
    with pytest.raises(ValueError, match="no merge method named 'tie'"):
        EvoMergeConfig.model_validate({"seed_methods": ["tie"]})
    with pytest.raises(ValueError, match="scorecard on the test split"):
        EvoMergeConfig.model_validate({"scorecard": {"split": "validation"}})
    with pytest.raises(ValueError, match="must measure what the validation suite does"):
        EvoMergeConfig.model_validate({"validation": SUITE})


def test_default_fitness_is_the_scorecard_on_validation():
    assert DEFAULT_VALIDATION.split == "validation" and DEFAULT_VALIDATION.text
    assert [(s, lv) for s, lv, _ in DEFAULT_VALIDATION.tasks] == [(s, lv) for s, lv, _ in ScorecardSpec().tasks]
    assert EvoMergeConfig().validation == DEFAULT_VALIDATION and EvoMergeConfig().scorecard == ScorecardSpec()


def test_margins_say_where_the_champion_wins():
    margins = champion_margins({"champion": -2.0, "base": -2.5, "specialist-a": -1.75, "uniform-linear": -2.0})
    assert margins == {"base": 0.5, "specialist-a": -0.25, "uniform-linear": 0.0}


def _card(text: tuple[list[float], list[int]], flags: list[int]) -> dict:
    return card_from_items(ScorecardSpec(), {"text": "t", "arithmetic.1": "a"},
                           {"text": {"loglikelihood": text[0], "n_bytes": text[1]}, "arithmetic.1": {"task_success": flags}})


def test_margin_interval_pairs_text_blocks_and_problems():
    champion = _card(([-100.0, -200.0], [100, 200]), [1] * 8 + [0] * 2)
    rival = _card(([-110.0, -220.0], [100, 200]), [1] * 5 + [0] * 5)
    interval = margin_interval(champion, rival, bpb_weight=1.0)
    # 3 more problems right of 10, and 30 fewer nats over 300 bytes.
    assert interval["margin"] == pytest.approx(0.3 + 30 / 300 / LOG2)
    assert interval["margin"] == pytest.approx(fitness_of(values(champion), 1.0) - fitness_of(values(rival), 1.0))
    assert 0 < interval["ci_low"] <= interval["margin"] <= interval["ci_high"]
    assert margin_interval(champion, champion, bpb_weight=1.0) == {"margin": 0.0, "ci_low": 0.0, "ci_high": 0.0}


def test_a_specialist_alone_seed_is_that_specialist(inputs):
    names = [m.name for m in inputs[1:4]]
    seeds = seed_recipes(["linear"], names, "base", layer_groups=2, seed=0)
    assert [seed_label(r) for r in seeds] == ["linear", *(f"{n} alone" for n in names)]
    alone = apply_recipe(specialist_alone(names, "base", 1, 2, 0), inputs)
    for name, tensor in weights_of(alone.model).items():
        assert torch.allclose(tensor, weights_of(inputs[2].model)[name], atol=1e-6), name


def test_missing_base_or_mismatched_models_fail_clearly(inputs):
    phase = EvoMergePhase()
    config = phase.parse_config(SMALL)
    with pytest.raises(ValueError, match="named 'base'"):
        phase.transform(inputs[1:], config)
    with pytest.raises(ValueError, match="at least two specialists"):
        phase.transform(inputs[:2], config)
    deeper = LlamaForCausalLM(tiny_config(3, vocab_size=len(inputs[0].tokenizer)))
    other = ForgedModel(deeper, inputs[0].tokenizer, "specialist-deep")
    with pytest.raises(ValueError, match="architecture"):
        phase.transform([*inputs, other], config)


@pytest.mark.slow
def test_transform_reports_a_reapplicable_champion(inputs, tmp_path):
    phase = EvoMergePhase()
    config = phase.parse_config(SMALL)
    result = phase.transform(inputs, config)
    report = result.report
    stages = [g["stage"] for g in report["fitness_per_generation"]]
    assert stages[0] == "seed" and "parameter_space" in stages and "data_flow" in stages
    # The multitask model is a baseline: scored, never merged or seeded.
    assert [e["seed"] for e in report["seed_round"]] == [
        "linear", "ties", "specialist-a alone", "specialist-b alone", "specialist-c alone"]
    assert report["lineage"]["parents"] == ["base", "specialist-a", "specialist-b", "specialist-c"]
    # The champion in mergekit's YAML beside our recipe, or the reason mergekit cannot express it.
    # A data-flow champion is a passthrough over slices, after its merged stage where it has one (mergekit-multi).
    exported = report["champion"]["mergekit"]
    final = exported["config"][-1] if isinstance(exported["config"], list) else exported["config"]
    assert exported["note"] and (final is None or final["merge_method"] == report["champion"]["recipe"].get("method", "passthrough"))
    assert_one_scorecard(report)
    section = report["scorecard"]
    assert section["inputs"] == ["base", "specialist-a", "specialist-b", "specialist-c", "multitask"]
    assert section["outputs"] == ["champion"] and section["baselines"] == ["multitask", "uniform-linear"]
    assert all(card["split"] == "test" for card in section["cards"].values())
    best_validation = max(g["best"] for g in report["fitness_per_generation"])
    assert report["champion"]["validation_fitness"] == best_validation
    # The test table compares the champion with every input and the uniform merge, from measured fitness.
    fitness = report["test_fitness"]
    rivals = {"base", "specialist-a", "specialist-b", "specialist-c", "uniform-linear"}
    assert fitness["champion"] == fitness_of(values(section["cards"]["champion"]), config.bpb_weight)
    assert report["champion_margin_on_test"] == {n: fitness["champion"] - fitness[n] for n in {*rivals, "multitask"}}
    assert report["champion_beats_every_parent_and_uniform_on_test"] == all(
        fitness["champion"] > fitness[n] for n in rivals)
    assert report["summary"]["smallest_margin_on_test"] == round(min(report["champion_margin_on_test"][n] for n in rivals), 4)
    # Without text, the paired interval's point estimate is the table's margin; the interval holds it.
    for name, interval in report["champion_margin_on_test_95pct"].items():
        assert interval["margin"] == pytest.approx(report["champion_margin_on_test"][name], abs=1e-12)
        assert interval["ci_low"] <= interval["margin"] <= interval["ci_high"]
        assert report["comparisons"][name]["relation"] in ("dominates", "dominated", "incomparable", "indistinguishable")
    assert report["champion_beats_every_parent_and_uniform_with_95pct_significance"] == all(
        report["champion_margin_on_test_95pct"][n]["ci_low"] > 0 for n in rivals)
    assert report["champion_beats_every_parent_with_95pct_significance"] == all(
        report["champion_margin_on_test_95pct"][n]["ci_low"] > 0 for n in report["lineage"]["parents"])
    multitask = report["champion_margin_on_test_95pct"]["multitask"]
    assert report["summary"]["champion_beats_multitask_with_95pct_significance"] == (multitask["ci_low"] > 0)
    assert report["summary"]["pareto_relation_to_multitask"] == report["comparisons"]["multitask"]["relation"]
    assert report["baselines_missing"] == []

    champion = result.models[0]
    again = apply_recipe(report["champion"]["recipe"], inputs, name=champion.name)
    digests = [save_checkpoint(m, tmp_path / str(i), phase="evomerge", code_version="1", config={}, config_hash="",
                               parents=[]).digest for i, m in enumerate([champion, again])]
    assert digests[0] == digests[1]


@pytest.mark.slow
def test_champion_beats_every_tiny_cognate_parent_on_test(tiny_champion, tiny_cognate, tmp_path):
    """The check on what `make run` merges: on the test split the search never saw, the champion is
    significantly better than the base, never significantly worse than any parent or the uniform merge (one of
    its seeds; at this scale the search adds little to it), and the report's verdicts follow from its margins;
    the report says whether it beats the multitask model; its recipe re-applied to the parents gives the same
    checkpoint. Beating every specialist significantly is not asserted: at `make run`'s settings it did in
    the headline bench's seed 0 (this one), while seeds 1 and 2 tie the text specialist (95% intervals
    [-0.011, +0.014] and [-0.008, +0.046]), and float rounding differs between CPUs."""
    report = tiny_champion.report
    assert_one_scorecard(report)
    margins = report["champion_margin_on_test_95pct"]
    parents = [name for name in margins if name not in ("multitask", "uniform-linear")]
    assert margins["base"]["ci_low"] > 0, margins["base"]
    for name in [*parents, "uniform-linear"]:
        assert margins[name]["ci_high"] > 0, (name, margins[name])
    assert report["champion_beats_every_parent_with_95pct_significance"] == all(
        margins[name]["ci_low"] > 0 for name in parents), margins
    assert "champion_beats_multitask_with_95pct_significance" in report["summary"]
    # Merged with the thread count the fixture's Cognate training left set; float sums round differently with
    # another count (one CI run's earlier tests had left 1), so the replay runs with the same one.
    threads = torch.get_num_threads()
    torch.set_num_threads(TrainingConfig().threads)
    try:
        again = apply_recipe(report["champion"]["recipe"], tiny_cognate.models, name="evomerge")
    finally:
        torch.set_num_threads(threads)
    digests = [save_checkpoint(m, tmp_path / str(i), phase="evomerge", code_version="1", config={}, config_hash="",
                               parents=[]).digest for i, m in enumerate([tiny_champion.models[0], again])]
    assert digests[0] == digests[1]
