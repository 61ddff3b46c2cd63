"""Forge training's mechanisms one by one: the Grokfast filter in the shared loop, the curriculum changing
what is fed, dream replay's buffer, the self-model's warm-up."""
from __future__ import annotations

import pytest
import torch

from services.forge.curriculum import CurriculumConfig, EdgeOfChaosController
from services.forge.dream import DreamConfig, ReplayBuffer
from services.forge.feed import CURRICULUM_SOURCE, ForgeFeed
from services.forge.self_model import SelfModelConfig, SelfModelingLM, self_modeling_loss
from shared.grokfast import GrokfastConfig, GrokfastEMA
from shared.models import build_model
from shared.training import TrainingConfig, collate, train_causal_lm

pytestmark = pytest.mark.unit
MICRO = TrainingConfig(steps=12, batch_size=4, learning_rate=1e-2, warmup_steps=2, eval_every=6, threads=1)


def _model(tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    return build_model("tiny", len(tokenizer), seed, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


# --- Grokfast --------------------------------------------------------------------------------------------


def test_a_constant_gradient_becomes_one_plus_lambda_times_itself():
    weight, unused = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.ones(2))
    grokfast = GrokfastEMA(GrokfastConfig(enabled=True, alpha=0.9, lamb=2.0))
    g = torch.tensor([1.0, -2.0, 0.5])
    for _ in range(200):
        weight.grad = g.clone()
        grokfast.filter([weight, unused])
    assert torch.allclose(weight.grad, 3.0 * g, atol=1e-6)
    assert unused.grad is None and unused not in grokfast.ema  # a parameter without a gradient is left alone


def test_the_first_gradient_seeds_the_ema_and_a_changing_one_is_low_passed():
    weight = torch.nn.Parameter(torch.zeros(1))
    grokfast = GrokfastEMA(GrokfastConfig(enabled=True, alpha=0.5, lamb=1.0))
    weight.grad = torch.tensor([2.0])
    grokfast.filter([weight])
    assert weight.grad.item() == pytest.approx(4.0)  # mu = g on the first step
    weight.grad = torch.tensor([-2.0])
    grokfast.filter([weight])
    assert grokfast.ema[weight].item() == pytest.approx(0.0) and weight.grad.item() == pytest.approx(-2.0)


def test_grokfast_off_or_at_lambda_zero_reproduces_the_plain_loop_and_on_changes_it(small_corpus):
    tokenizer, rows = small_corpus

    def trained(config: TrainingConfig):
        model = _model(tokenizer)
        train_causal_lm(model, {"all": rows}, {"all": 1.0}, config, pad_id=tokenizer.pad_token_id)
        return model.state_dict()

    plain = trained(MICRO)
    off = trained(MICRO.model_copy(update={"grokfast": GrokfastConfig(enabled=False, lamb=5.0)}))
    zero = trained(MICRO.model_copy(update={"grokfast": GrokfastConfig(enabled=True, lamb=0.0)}))
    on = trained(MICRO.model_copy(update={"grokfast": GrokfastConfig(enabled=True)}))
    assert all(torch.equal(plain[k], off[k]) and torch.equal(plain[k], zero[k]) for k in plain)
    assert not all(torch.equal(plain[k], on[k]) for k in plain)


# --- the curriculum --------------------------------------------------------------------------------------


def test_the_fed_batches_change_level_when_success_leaves_the_band(small_corpus):
    tokenizer, rows = small_corpus
    third = len(rows) // 3
    pools = {1: rows[:third], 2: rows[third:2 * third], 3: rows[2 * third:]}
    success = iter([0.9, 0.6, 0.9, 0.1])  # above the band, inside it, above again, below it

    def scripted(model, tokenizer, examples):
        rate = next(success)
        return [int(i < rate * len(examples)) for i in range(len(examples))]

    controller = EdgeOfChaosController(CurriculumConfig(window=10, check_every=3), success_fn=scripted)
    feed = ForgeFeed({CURRICULUM_SOURCE: pools[1], "text": rows[:5]}, {CURRICULUM_SOURCE: 1.0}, lm=None,
                     tokenizer=tokenizer, level_pools=pools, controller=controller)
    generator = torch.Generator().manual_seed(0)
    fed_levels = []
    for step in range(12):
        batch = feed.draw(step, 8, generator)
        fed_levels.append({level for level, pool in pools.items() for row in batch if row in pool})
        feed.after_step(step, None, batch)
    assert fed_levels == [{1}] * 3 + [{2}] * 3 + [{2}] * 3 + [{3}] * 3
    assert [m.next_level for m in controller.history] == [2, 2, 3, 2]  # the last move shows in the next batch
    assert feed.levels == [1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3]


def test_each_measurement_takes_a_fresh_window_of_train_problems():
    seen = []

    def record(model, tokenizer, examples):
        seen.append([e.key for e in examples])
        return [1] * len(examples)

    controller = EdgeOfChaosController(CurriculumConfig(levels=(1,), window=16), success_fn=record)
    for step in range(3):
        controller.measure(step, None, None)
    assert seen[0] != seen[1] != seen[2]
    assert controller.level == 1  # nothing harder on a one-level ladder


# --- dream replay ----------------------------------------------------------------------------------------


def test_replay_mixes_earlier_rows_and_the_models_dreams_in_its_share(small_corpus):
    tokenizer, rows = small_corpus
    model = _model(tokenizer).eval()
    config = DreamConfig(share=0.5, every=2, per_round=3, length=5)
    buffer = ReplayBuffer(config, seed=0)
    feed = ForgeFeed({"all": rows}, {"all": 1.0}, lm=model, tokenizer=tokenizer, replay=buffer)
    generator = torch.Generator().manual_seed(0)
    for step in range(20):
        feed.after_step(step, model, feed.draw(step, 8, generator))
    fed = feed.fed
    assert fed["dream"] > 0 and fed["replayed_real"] > 0
    assert 0.35 < (fed["dream"] + fed["replayed_real"]) / sum(fed.values()) < 0.6
    dream = buffer.dreams[0]
    assert any(dream[: config.prompt_tokens] == row[: config.prompt_tokens] for row in rows)  # a real row's start
    assert config.prompt_tokens < len(dream) <= config.prompt_tokens + config.length
    assert len(buffer.dreams) == 10 * config.per_round


# --- self-modeling ---------------------------------------------------------------------------------------


def test_the_self_model_shapes_the_trunk_only_after_its_warm_up(small_corpus):
    tokenizer, rows = small_corpus
    batch = collate(rows[:4], tokenizer.pad_token_id)

    def trunk_gradient(warmup_steps: int, weight: float):
        trainee = SelfModelingLM(_model(tokenizer), SelfModelConfig(weight=weight, warmup_steps=warmup_steps))
        with torch.no_grad():
            trainee.head.weight.fill_(0.05)
        loss, count, figures = self_modeling_loss(trainee, *batch)
        (loss / count).backward()
        return trainee.lm.model.embed_tokens.weight.grad.clone(), trainee.head.weight.grad, figures

    plain, _, _ = trunk_gradient(warmup_steps=0, weight=0.0)
    warming, head_grad, figures = trunk_gradient(warmup_steps=5, weight=1.0)
    on, _, on_figures = trunk_gradient(warmup_steps=0, weight=1.0)
    assert torch.allclose(plain, warming)  # before the warm-up the head learns but the trunk does not feel it
    assert head_grad.abs().sum() > 0 and figures["self_model_on"] == 0.0
    assert not torch.allclose(plain, on) and on_figures["self_model_on"] == 1.0
    assert on_figures["self_model_mse"] > 0 and on_figures["own_loss_variance"] > 0
