"""Evaluation on a tiny Llama: bits per byte against direct computations, greedy generation and choice
log-likelihoods against unbatched reference scoring, and the Wilson interval."""
from __future__ import annotations

import math

import pytest
import torch

from shared import evaluation
from shared.data.tasks import make_examples
from shared.data.text import english_documents
from shared.evaluation import (
    argmax,
    bits_per_byte,
    choice_loglikelihoods,
    greedy_continuations,
    rolling_loglikelihoods,
    rolling_windows,
    wilson_interval,
)
from shared.models import Preset, build_model
from shared.tokenizer import train_tokenizer

pytestmark = pytest.mark.unit

MICRO = Preset(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, vocab_size=512, max_positions=64)


@pytest.fixture(scope="module")
def tokenizer():
    torch.set_num_threads(1)
    return train_tokenizer([english_documents("train")[0][:100_000]], vocab_size=512, model_max_length=64)


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_model(MICRO, len(tokenizer), seed=0, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def direct_loglikelihood(model, context: list[int], continuation: list[int]) -> float:
    """log P(continuation | context) from one plain forward pass, no batching or padding."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(logprobs[len(context) - 1 + i, token].item() for i, token in enumerate(continuation))


def test_rolling_windows_worked_example():
    # lm-eval's disjoint windows for 7 tokens, max_length 3, prefix 99 (checked by hand against its code).
    assert rolling_windows([1, 2, 3, 4, 5, 6, 7], 99, 3) == [
        ([99], [1, 2, 3]),
        ([3], [4, 5, 6]),
        ([4, 5, 6], [7]),  # the last window reads a full max_length of context + continuation[:-1]
    ]
    assert rolling_windows([1, 2], 99, 3) == [([99], [1, 2])]
    assert rolling_windows([], 99, 3) == []
    with pytest.raises(ValueError, match="max_length"):
        rolling_windows([1], 99, 0)


@pytest.mark.parametrize("max_length", [1, 5, 16, 64])
def test_windows_predict_every_token_once_reading_at_most_max_length(max_length):
    tokens = list(range(100, 237))
    windows = rolling_windows(tokens, 0, max_length)
    assert [t for _, continuation in windows for t in continuation] == tokens
    assert windows[0][0] == [0]
    for context, continuation in windows:
        assert len(context) + len(continuation) - 1 <= max_length
        # Each window's context ends right before its first predicted token (or is the prefix).
        start = tokens.index(continuation[0])
        assert context[-1] == (tokens[start - 1] if start else 0)


def test_bits_per_byte_of_one_window_equals_a_direct_forward_pass(model, tokenizer):
    document = "Fair is foul, and foul is fair:\nHover through the fog and filthy air."
    tokens = tokenizer(document, add_special_tokens=False)["input_ids"]
    assert len(tokens) < 64
    expected = direct_loglikelihood(model, [tokenizer.eos_token_id], tokens)
    scores = bits_per_byte(model, tokenizer, [document])
    assert scores["loglikelihood"] == pytest.approx(expected, rel=1e-9)
    assert scores["bits_per_byte"] == pytest.approx(-expected / len(document.encode()) / math.log(2), rel=1e-9)
    assert scores["n_tokens"] == len(tokens) and scores["max_length"] == 64


def test_bits_per_byte_sums_windows_each_scored_directly(model, tokenizer, monkeypatch):
    document = english_documents("test")[0][:3000]
    tokens = tokenizer(document, add_special_tokens=False)["input_ids"]
    expected = sum(
        direct_loglikelihood(model, context, continuation)
        for context, continuation in rolling_windows(tokens, tokenizer.eos_token_id, 16)
    )
    for batch_size in (1, 5):
        scores = bits_per_byte(model, tokenizer, [document], max_length=16, batch_size=batch_size)
        assert scores["loglikelihood"] == pytest.approx(expected, rel=1e-9)
    monkeypatch.setattr(evaluation, "LOGITS_BUDGET_BYTES", 1)  # forces one row per batch
    scores = bits_per_byte(model, tokenizer, [document], max_length=16, batch_size=5)
    assert scores["loglikelihood"] == pytest.approx(expected, rel=1e-9)


def test_a_uniform_model_costs_log2_vocabulary_bits_per_token(model, tokenizer):
    uniform = build_model(MICRO, len(tokenizer), seed=1, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        uniform.model.norm.weight.zero_()  # every logit 0: each token has probability 1/V
    documents = english_documents("validation")
    scores = bits_per_byte(uniform, tokenizer, documents, max_length=32)
    n_tokens = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in documents)
    assert scores["n_tokens"] == n_tokens
    assert scores["n_bytes"] == sum(len(d.encode("utf-8")) for d in documents)
    assert scores["bits_per_byte"] == pytest.approx(n_tokens * math.log2(len(tokenizer)) / scores["n_bytes"], rel=1e-9)
    assert scores["byte_perplexity"] == pytest.approx(2 ** scores["bits_per_byte"], rel=1e-9)


def test_bytes_and_words_are_counted_as_lm_eval_counts_them(model, tokenizer):
    scores = bits_per_byte(model, tokenizer, [" café au lait ", "x"])
    assert scores["n_bytes"] == 15 + 1  # é is two bytes in UTF-8
    assert scores["n_words"] == 5 + 1  # re.split(r"\s+") keeps the empty ends
    assert scores["word_perplexity"] == pytest.approx(math.exp(-scores["loglikelihood"] / 6))
    with pytest.raises(ValueError, match="at least one document"):
        bits_per_byte(model, tokenizer, [])


def test_batched_greedy_generation_equals_one_prompt_at_a_time(model, tokenizer):
    examples = make_examples("arithmetic", 2, "validation", 6) + make_examples("word_problems", 1, "validation", 3)
    prompts = [e.prompt for e in examples]
    batched = greedy_continuations(model, tokenizer, prompts, max_new_tokens=8, batch_size=4)
    alone = [greedy_continuations(model, tokenizer, [p], max_new_tokens=8)[0] for p in prompts]
    assert batched == alone
    assert any(batched)  # the micro model writes something, even if it is wrong


def test_rolling_loglikelihoods_score_each_document_as_bits_per_byte_does(model, tokenizer):
    documents = [d[:3000] for d in english_documents("validation")]
    each = rolling_loglikelihoods(model, tokenizer, documents, max_length=32, batch_size=3)
    for document, loglikelihood in zip(documents, each, strict=True):
        assert loglikelihood == pytest.approx(bits_per_byte(model, tokenizer, [document], max_length=32)["loglikelihood"])
    model.train()  # evaluation switches to eval mode and restores the caller's mode
    rolling_loglikelihoods(model, tokenizer, documents[:1], max_length=32)
    assert model.training
    model.eval()


def test_multiple_choice_picks_the_choice_a_direct_computation_prefers(model, tokenizer):
    examples = make_examples("multiple_choice", 2, "validation", 12)
    correct = 0
    for example in examples:
        context = tokenizer(example.prompt)["input_ids"]
        lls = []
        for choice in example.choices:
            whole = tokenizer(example.prompt + " " + choice)["input_ids"]
            assert whole[: len(context)] == context
            lls.append(direct_loglikelihood(model, context, whole[len(context) :]))
        correct += lls.index(max(lls)) == example.label
    scores = choice_loglikelihoods(model, tokenizer, examples, batch_size=5)
    assert sum(argmax(lls) == e.label for lls, e in zip(scores, examples, strict=True)) == correct
    with pytest.raises(ValueError, match="not a multiple-choice example"):
        choice_loglikelihoods(model, tokenizer, make_examples("arithmetic", 1, "test", 1))


def test_wilson_interval_known_values():
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
