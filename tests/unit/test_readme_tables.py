"""The README's result tables are the seeds benchmark's output, rendered: never typed in, never stale."""
from __future__ import annotations

import json
import math

import pytest

from bench.adas import DEFAULT_OUT as ADAS_OUT
from bench.adas import FRONT_PICTURE as ADAS_PICTURE
from bench.adas import SEEDS as ADAS_SEEDS
from bench.baking import DEFAULT_OUT as BAKING_OUT
from bench.baking import RUNS as BAKING_RUNS
from bench.compression import DEFAULT_OUT as COMPRESSION_OUT
from bench.compression import SETTINGS as COMPRESSION_SETTINGS
from bench.forge import DEFAULT_OUT as FORGE_OUT
from bench.quietstar import DEFAULT_OUT as QUIETSTAR_OUT
from bench.readme import README, load_results, rendered
from bench.seeds import DEFAULT_OUT

pytestmark = pytest.mark.unit


def test_readme_results_are_generated_from_the_seeds_benchmark_file():
    results = json.loads(DEFAULT_OUT.read_text())
    assert len(results["seeds"]) >= 3 and len({r["seed"] for r in results["seeds"]}) == len(results["seeds"])
    readme = README.read_text()
    assert rendered(readme, load_results()) == readme, "run `python -m bench.readme` after the benchmarks"


def test_the_file_holds_every_phase_of_every_seed_with_intervals():
    results = json.loads(DEFAULT_OUT.read_text())
    for record in results["seeds"]:
        for phase in ("cognate", "evomerge", "bitnet"):
            for name, metrics in record[phase]["models"].items():
                for metric, value in metrics.items():
                    assert value["ci_low"] <= value["value"] <= value["ci_high"], (record["seed"], phase, name, metric)
        assert set(record["evomerge"]["margins"]) >= {"multitask", "uniform-linear", "base"}


def test_the_quietstar_file_holds_the_test_table_and_an_ablation_of_three_thought_lengths():
    results = json.loads(QUIETSTAR_OUT.read_text())
    assert set(results["test"]["cards"]) == {"input", "output", "output_thinking"}
    for card in results["test"]["cards"].values():
        for metric, value in card["metrics"].items():
            assert value["ci_low"] <= value["value"] <= value["ci_high"], metric
    lengths = sorted(int(n) for n in results["ablation"])
    assert 0 in lengths and len(lengths) >= 3 and results["default_thought_length"] in lengths
    for run in results["ablation"].values():
        assert run["validation"]["cards"]["output"]["split"] == "validation"
        difference = run["validation"]["thinking_vs_not"]["metrics"]["text.bits_per_byte"]
        assert difference["ci_low"] <= difference["difference"] <= difference["ci_high"]
        assert run["speed"]["generation"]["with_thoughts"]["tokens_per_second"] > 0


def test_the_forge_file_holds_every_ablation_run_and_the_ternary_check():
    results = json.loads(FORGE_OUT.read_text())
    cards = results["test"]["cards"]
    assert set(cards) == {"input", "forge", "no_grokfast", "no_curriculum", "no_self_model", "no_dream", "all_off"}
    for card in cards.values():
        assert card["split"] == "test"
        for metric, value in card["metrics"].items():
            assert value["ci_low"] <= value["value"] <= value["ci_high"], metric
    assert set(results["test"]["ablation"]) == set(cards) - {"input", "forge"}
    assert results["ternary"]["same_packed_size"]
    steps = results["config"]["training"]["steps"]
    assert all(len(run["train_loss"]) == steps for run in results["runs"].values())


def test_the_baking_file_holds_every_run_with_its_kl_behaviour_and_scorecard():
    results = json.loads(BAKING_OUT.read_text())
    assert set(results["runs"]) == set(BAKING_RUNS)
    for run in results["runs"].values():
        assert set(run["screening"]) == {prompt["name"] for prompt in run["config"]["prompts"]}
        for prompt in run["baked_prompts"]:
            kl = run["test"][prompt]["kl"]
            assert kl["teacher_to_baked"] == pytest.approx(kl["ratio"] * kl["teacher_to_input"])
            for difference in run["test"][prompt]["baked_against_input"].values():
                assert difference["ci_low"] <= difference["difference"] <= difference["ci_high"]
        for card in run["cards"].values():
            assert card["split"] == "test"
        if run["baked_prompts"]:
            assert run["ternary"]["same_packed_size"] and run["ternary"]["packed_logits_max_abs_diff"] == 0.0


def test_the_adas_file_holds_each_seed_with_an_evaluated_front_and_the_picture_exists():
    from services.adas.search import pareto_front

    results = json.loads(ADAS_OUT.read_text())
    assert set(results["runs"]) == {str(seed) for seed in ADAS_SEEDS}
    for run in results["runs"].values():
        assert run["trainable_per_expert"] == run["sum_min_dimensions"]
        search = run["search"]
        assert search["front"] == pareto_front(search["points"]) and search["chosen"] in search["front"]
        assert set(run["own_family"]) == {family["name"] for family in run["config"]["families"]}
        for measures in run["own_family"].values():
            for d in measures.values():
                assert d["ci_low"] <= d["difference"] <= d["ci_high"]
        assert run["ternary"]["same_packed_size"] and run["ternary"]["packed_logits_max_abs_diff"] == 0.0
        assert all(card["split"] == "test" for card in run["cards"].values())
    assert ADAS_PICTURE.read_bytes().startswith(b"\x89PNG")


def test_the_compression_file_holds_both_settings_rebuilt_exactly_with_the_formulas_bits():
    results = json.loads(COMPRESSION_OUT.read_text())
    assert set(results["runs"]) == set(COMPRESSION_SETTINGS)
    for run in results["runs"].values():
        coders = [coder for coder in ("seedlm", "vq") if coder in run]  # a coder that found nothing left is absent
        assert coders
        for coder in coders:
            found = run[coder]
            for tensor in found["tensors"].values():
                if coder == "seedlm":  # the last block is padded: ceil(n / C) blocks of C weights
                    n = math.prod(tensor["shape"])
                    padded = math.ceil(n / found["block"]) * found["block"] / n
                    assert tensor["payload_bits_per_weight"] == pytest.approx(found["formula_bits_per_weight"] * padded,
                                                                              rel=1e-12)
                else:
                    assert tensor["payload_bits_per_weight"] == tensor["formula_bits_per_weight"]
                assert tensor["decode_is_exact"]
            assert found["baselines"]["bits_per_weight"] >= found["formula_bits_per_weight"]
        assert run["rebuilt_logits_max_abs_diff"] == 0.0
        assert [stage["stage"] for stage in run["stages"]] == list(run["config"]["stages"])
        assert all(card["split"] == "test" for card in run["cards"].values())
        sizes = run["sizes"]["compressed"]
        assert sizes["file_bytes"] == sum(sizes[k] for k in ("ternary_range_coded", "ternary_packed", "ternary_scales",
                                                             "seedlm", "vq", "float16", "other_tensors", "header_bytes"))


def test_the_pipeline_file_times_both_presets_phase_by_phase_with_the_headline():
    from bench.pipeline import DEFAULT_OUT as PIPELINE_OUT
    from bench.pipeline import GOALS_S
    from shared.fabric.cli import PIPELINE_ORDER

    presets = json.loads(PIPELINE_OUT.read_text())["presets"]
    assert set(presets) == set(GOALS_S)
    for name, preset in presets.items():
        assert [phase["phase"] for phase in preset["phases"]] == list(PIPELINE_ORDER), name
        # The phases and the headline `agentforge run` ends with happen within the wall time, one after another.
        assert preset["headline_seconds"] > 0
        assert sum(phase["seconds"] for phase in preset["phases"]) + preset["headline_seconds"] <= preset["seconds"]
        assert preset["goal_seconds"] == GOALS_S[name]
        assert preset["within_goal"] == (preset["seconds"] <= GOALS_S[name])
