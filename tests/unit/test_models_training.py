"""The shared training loop: packing, padding, label shift, learning, determinism, clear config errors."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from shared.calculator import result_spans
from shared.models import build_model
from shared.training import (
    NOT_PREDICTED,
    TrainingConfig,
    causal_lm_loss,
    collate,
    encode_texts,
    mean_loss,
    pack_rows,
    train_causal_lm,
)

pytestmark = pytest.mark.unit
EOS, PAD = 0, 1
MICRO = TrainingConfig(steps=30, batch_size=4, learning_rate=1e-2, warmup_steps=3, eval_every=10, threads=1)


def test_pack_rows_keeps_pieces_whole_and_rows_short():
    rows = pack_rows([[5, 6], [7, 8, 9], list(range(10, 22))], seq_len=5, eos_id=EOS)
    assert rows == [[5, 6, EOS], [7, 8, 9, EOS], [10, 11, 12, 13, 14], [15, 16, 17, 18, 19], [20, 21, EOS]]
    assert all(len(r) <= 5 for r in rows)
    assert pack_rows([[5], [6], [7]], seq_len=6, eos_id=EOS) == [[5, EOS, 6, EOS, 7, EOS]]


def test_collate_right_pads_with_a_mask():
    ids, mask, predicted = collate([[5, 6, 7], [8]], PAD)
    assert ids.tolist() == [[5, 6, 7], [8, PAD, PAD]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_loss_is_next_token_nll_and_padding_counts_for_nothing():
    model = build_model("tiny", 512, 0, eos_token_id=EOS, pad_token_id=PAD).eval()
    row, short = [5, 9, 13, 2, 7, 11], [4, 8, 3]
    with torch.no_grad():
        alone_sum, alone_n = causal_lm_loss(model, *collate([row], PAD))
        # transformers shifts labels itself; the mean must agree with ours.
        reference = model(input_ids=torch.tensor([row]), labels=torch.tensor([row])).loss
        assert alone_n == len(row) - 1
        assert torch.allclose(alone_sum / alone_n, reference, atol=1e-5)
        short_sum, short_n = causal_lm_loss(model, *collate([short], PAD))
        batch_sum, batch_n = causal_lm_loss(model, *collate([row, short], PAD))
    assert batch_n == alone_n + short_n
    assert torch.allclose(batch_sum, alone_sum + short_sum, atol=1e-4)


def test_read_only_tokens_are_read_but_never_predicted(small_corpus):
    tokenizer, _ = small_corpus
    text = "1 + 2 <calc>1+2</calc><result>3</result> 3\n"
    (row,) = encode_texts(tokenizer, [text], 64, read_only=result_spans)
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids, mask, predicted = collate([row], PAD)
    assert ids.tolist() == [tokens]  # the model reads every token
    read_only = "".join(tokenizer.decode([t]) for t, p in zip(tokens, predicted[0].tolist(), strict=True) if not p)
    assert read_only in ("result>3</result>", "<result>3</result>")  # a token straddling the call's close is predicted
    model = build_model("tiny", len(tokenizer), 0, eos_token_id=EOS, pad_token_id=PAD).eval()
    with torch.no_grad():
        _, counted = causal_lm_loss(model, ids, mask, predicted)
        _, every = causal_lm_loss(model, ids, mask)
    assert every - counted == len(tokens) - sum(predicted[0].tolist()) > 0
    assert row[0] < NOT_PREDICTED


def test_training_lowers_held_out_loss_and_records_the_curve(small_corpus):
    tokenizer, rows = small_corpus
    model = build_model("tiny", len(tokenizer), 0, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    before = mean_loss(model, rows[:8], tokenizer.pad_token_id)
    seen = []
    curve = train_causal_lm(model, {"all": rows}, {"all": 1.0}, MICRO, pad_id=tokenizer.pad_token_id,
                            eval_sets={"held": rows[:8]}, progress=lambda f, m: seen.append(f))
    assert len(curve.train_loss) == MICRO.steps and curve.eval_steps == [0, 10, 20, 30]
    assert curve.eval_loss["held"][0] == pytest.approx(before, rel=1e-5)
    assert curve.eval_loss["held"][-1] < 0.5 * before
    assert seen[-1] == 1.0 and curve.tokens > 0 and curve.tokens_per_second > 0


def test_same_seed_and_data_give_the_same_weights(small_corpus):
    tokenizer, rows = small_corpus

    half = len(rows) // 2
    sources = {"sums": rows[:half], "cats": rows[half:]}

    def trained(seed: int, mix: dict[str, float]):
        model = build_model("tiny", len(tokenizer), 0, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        config = MICRO.model_copy(update={"steps": 8, "seed": seed})
        train_causal_lm(model, sources, mix, config, pad_id=tokenizer.pad_token_id)
        return model.state_dict()

    mix = {"sums": 0.7, "cats": 0.3}
    a, b, c = trained(1, mix), trained(1, mix), trained(2, mix)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    # A config read back from JSON has its keys sorted; the same mix must train the same model.
    reordered = trained(1, {"cats": 0.3, "sums": 0.7})
    assert all(torch.equal(a[k], reordered[k]) for k in a)


def test_bad_config_and_mix_fail_clearly(small_corpus):
    tokenizer, rows = small_corpus
    with pytest.raises(ValidationError, match="warmup_steps"):
        TrainingConfig(steps=5, warmup_steps=5)
    with pytest.raises(ValidationError):
        TrainingConfig(steps=5, warmup_steps=1, lr=0.1)
    model = build_model("tiny", len(tokenizer), 0)
    with pytest.raises(ValueError, match="not among"):
        train_causal_lm(model, {"all": rows}, {"other": 1.0}, MICRO, pad_id=tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="positive weight"):
        train_causal_lm(model, {"all": rows}, {"all": 0.0}, MICRO, pad_id=tokenizer.pad_token_id)


def test_a_step_loss_replaces_the_loss_and_its_figures_are_logged_per_step(small_corpus):
    """A phase's own objective (Quiet-STaR's) runs through the same loop; the causal loss passed as one trains
    exactly the plain loop's weights."""
    tokenizer, rows = small_corpus

    def trained(step_loss):
        model = build_model("tiny", len(tokenizer), 0, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        config = MICRO.model_copy(update={"steps": 5})
        curve = train_causal_lm(model, {"all": rows}, {"all": 1.0}, config, pad_id=tokenizer.pad_token_id,
                                step_loss=step_loss)
        return model.state_dict(), curve

    def wrapped(model, *batch):
        loss_sum, count = causal_lm_loss(model, *batch)
        return loss_sum, count, {"tokens": float(count)}

    plain, plain_curve = trained(None)
    custom, curve = trained(wrapped)
    assert all(torch.equal(plain[k], custom[k]) for k in plain)
    assert curve.train_loss == plain_curve.train_loss and not plain_curve.logged
    assert len(curve.logged["tokens"]) == 5 and sum(curve.logged["tokens"]) == curve.tokens
    assert curve.as_report()["logged"]["tokens"] == curve.logged["tokens"]


def test_keep_best_ends_with_the_weights_of_the_lowest_held_out_loss(small_corpus):
    """Early stopping (prompt baking keeps its best validation step): an eval loss whose minimum is the second
    evaluation leaves the model with the weights it had then, not the last ones."""
    tokenizer, rows = small_corpus
    model = build_model("tiny", len(tokenizer), 0, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    scripted, snapshots = iter([3.0, 1.0, 2.0, 2.5]), []

    def eval_loss(model, rows):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scripted)

    curve = train_causal_lm(model, {"all": rows}, {"all": 1.0}, MICRO, pad_id=tokenizer.pad_token_id,
                            eval_sets={"held": rows[:4]}, eval_loss=eval_loss, keep_best="held")
    assert curve.eval_steps == [0, 10, 20, 30] and curve.best_step == 10 and curve.as_report()["best_step"] == 10
    assert all(torch.equal(value, snapshots[1][key]) for key, value in model.state_dict().items())
    assert not all(torch.equal(value, snapshots[-1][key]) for key, value in model.state_dict().items())
    with pytest.raises(ValueError, match="keep_best"):
        train_causal_lm(model, {"all": rows}, {"all": 1.0}, MICRO, pad_id=tokenizer.pad_token_id,
                        eval_sets={"held": rows[:4]}, keep_best="other")
