"""The Quiet-STaR phase end to end: its report on the shared scorecard, the checkpoint it hands on (thought
tokens, the carried mixing head) through save/load and through BitNet, bad input, and on the tiny champion
the reward rising above zero."""
import dataclasses

import pytest
import torch

from services.bitnet.__main__ import train_float_model
from services.bitnet.phase import BitNetConfig, BitNetPhase
from services.quietstar.mixing_head import MIXING_HEAD_FILE, head_metadata
from services.quietstar.phase import QuietStarConfig, QuietStarPhase
from services.quietstar.thoughts import END_THOUGHT, START_THOUGHT, thought_tokens
from shared.checkpoint import load_checkpoint, save_checkpoint
from shared.models import Preset
from shared.phase import get_phase
from shared.scorecard import ScorecardSpec
from tests.make_run import make_run_config
from tests.scorecard_checks import assert_one_scorecard

pytestmark = [pytest.mark.unit, pytest.mark.slow]

MICRO_SHAPE = Preset(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=192, vocab_size=512, max_positions=96)
MICRO_SCORECARD = ScorecardSpec(split="validation", tasks=(("arithmetic", 1, 6), ("tool_calls", 2, 4)), max_new_tokens=4)
MICRO = QuietStarConfig(
    objective={"thought_length": 3, "n_true": 2},
    training={"steps": 12, "batch_size": 2, "warmup_steps": 1, "eval_every": 6, "learning_rate": 1e-3},
    seq_len=24, task_examples=200, train_text_chars=50_000, held_out_rows=4, scorecard=MICRO_SCORECARD)


@pytest.fixture(scope="module")
def micro_model():
    return train_float_model(MICRO_SHAPE, BitNetConfig(task_examples=300, train_text_chars=100_000), 60, "micro")


@pytest.fixture(scope="module")
def result(micro_model):
    return QuietStarPhase().transform([micro_model], MICRO)


def test_phase_is_registered_and_rejects_unknown_config_keys():
    phase = get_phase("quietstar")
    assert isinstance(phase, QuietStarPhase)
    with pytest.raises(ValueError):
        phase.parse_config({"thoughts": 4})


def test_report_scores_input_and_output_with_and_without_thoughts_on_one_scorecard(result):
    report = result.report
    assert_one_scorecard(report)
    section = report["scorecard"]
    assert section["inputs"] == ["input"] and section["outputs"] == ["output", "output_thinking"]
    # Text windows leave room for a thought: 96 positions - (3 thought tokens + start + end + 1).
    assert section["spec"]["max_length"] == 96 - 6
    cards = section["cards"]
    assert cards["output_thinking"]["items"]["text"] != cards["output"]["items"]["text"]
    for name in ("thinking_vs_not", "thinking_vs_input", "output_vs_input"):
        assert report["comparisons"][name]["relation"] in ("dominates", "dominated", "incomparable", "indistinguishable")
    logged = report["training_curve"]["logged"]
    assert set(logged) == {"mean_reward", "policy_loss", "lm_loss", "base_loss", "mixed_loss", "mean_w"}
    assert all(len(values) == 12 for values in logged.values())
    assert logged["mean_w"][0] == 0 and logged["mean_reward"][0] == 0  # the head starts at w = 0
    assert report["reward"]["last"] == pytest.approx(sum(logged["mean_reward"][-2:]) / 2)


def test_the_output_is_a_standard_checkpoint_with_thought_tokens_and_the_carried_head(micro_model, result, tmp_path):
    (output,) = result.models
    tokens = thought_tokens(output.tokenizer)
    assert len(output.tokenizer) == len(micro_model.tokenizer) + 2
    assert output.model.get_input_embeddings().weight.shape[0] == len(output.tokenizer)
    assert output.model.generation_config.suppress_tokens == tokens.ids
    assert not output.model.get_input_embeddings().weight[tokens.ids].any()
    assert START_THOUGHT not in micro_model.tokenizer.get_vocab()  # the input is untouched
    assert head_metadata(output.carried[MIXING_HEAD_FILE])["thought_length"] == "3"
    save_checkpoint(output, tmp_path / "qs", phase="quietstar", code_version="1", config={}, config_hash="x", parents=[])
    reloaded, manifest = load_checkpoint(tmp_path / "qs")
    assert f"carried/{MIXING_HEAD_FILE}" in manifest.files
    assert reloaded.carried == output.carried
    assert thought_tokens(reloaded.tokenizer) == tokens and END_THOUGHT in reloaded.tokenizer.get_vocab()
    batch = torch.randint(0, len(micro_model.tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(reloaded.model(batch).logits, output.model(batch).logits, atol=1e-6)
    # The next phase hands the head on unchanged.
    quick = BitNetConfig(float_control=False, training={"steps": 2, "batch_size": 2, "warmup_steps": 0, "eval_every": 2},
                         seq_len=24, task_examples=50, train_text_chars=20_000, held_out_rows=2, calibration_rows=2,
                         scorecard=ScorecardSpec(split="validation", text=False, tasks=(("arithmetic", 1, 2),),
                                                 max_new_tokens=2))
    quantized = BitNetPhase().transform([reloaded], quick).models[0]
    assert quantized.carried == output.carried


def test_bad_input_is_refused(micro_model, result):
    phase = QuietStarPhase()
    with pytest.raises(ValueError, match="exactly one model"):
        phase.transform([micro_model, micro_model], MICRO)
    too_long = MICRO.model_copy(update={"objective": MICRO.objective.model_copy(update={"thought_length": 95})})
    with pytest.raises(ValueError, match="leaves no room"):
        phase.transform([micro_model], too_long)
    with pytest.raises(ValueError, match="went through Quiet-STaR before"):
        phase.transform(result.models, MICRO)


def test_on_the_tiny_champion_the_mean_reward_rises_above_zero(tiny_champion):
    """The check on what `make run` trains: thoughts come to help predict the text (the report's curve)."""
    (champion,) = tiny_champion.models
    result = QuietStarPhase().transform([dataclasses.replace(champion)], make_run_config("quietstar"))
    assert_one_scorecard(result.report)
    reward = result.report["reward"]
    assert reward["above_zero"] and reward["last"] > reward["first"], reward
