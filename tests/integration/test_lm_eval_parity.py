"""Our scores equal lm-evaluation-harness's on the same model and text (slow: trains a micro Llama briefly
and imports lm-eval). No servers are needed; it lives here because it checks us against an outside tool.

bits per byte: ours against HFLM.loglikelihood_rolling on the held-out plays, the wikitext metric
computed from its sums; the brief allows 0.5%, and the windows are the same so we expect rounding only.
multiple choice: per-choice log-likelihoods against HFLM.loglikelihood.
"""
from __future__ import annotations

import math

import pytest
import torch

from shared.data.tasks import ANSWER_DELIMITER, format_for_training, make_examples, training_stream
from shared.data.text import english_documents
from shared.evaluation import bits_per_byte, choice_loglikelihoods, rolling_windows
from shared.models import Preset, build_model
from shared.tokenizer import train_tokenizer
from shared.training import TrainingConfig, encode_texts, train_causal_lm

pytestmark = pytest.mark.slow

MICRO = Preset(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=192, vocab_size=512, max_positions=64)


@pytest.fixture(scope="module")
def trained():
    """A micro Llama trained 150 steps on Shakespeare and task text, so its predictions are not uniform."""
    torch.set_num_threads(1)
    text = english_documents("train")[:3]
    tasks = [format_for_training(e) for e, _ in zip(training_stream({"multiple_choice": 1.0}, [1]), range(2000))]
    tokenizer = train_tokenizer([*text, *tasks], vocab_size=MICRO.vocab_size, model_max_length=MICRO.max_positions)
    model = build_model(MICRO, len(tokenizer), seed=0, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    sources = {"text": encode_texts(tokenizer, text, 64), "tasks": encode_texts(tokenizer, tasks, 64)}
    train_causal_lm(model, sources, {"text": 1.0, "tasks": 1.0}, TrainingConfig(steps=150, threads=1), pad_id=tokenizer.pad_token_id)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def harness(trained):
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = trained
    # add_bos_token=False: both sides then tokenize documents without special tokens (see bits_per_byte).
    return HFLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=16, max_length=32, add_bos_token=False)


def test_rolling_windows_are_lm_eval_windows():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for n in (0, 1, 2, 7, 31, 32, 33, 64, 65, 100):
        tokens = list(range(10, 10 + n))
        for max_length in (1, 2, 5, 32):
            theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 3, max_length, context_len=1)]
            assert rolling_windows(tokens, 3, max_length) == [tuple(w) for w in theirs]


def test_bits_per_byte_equals_lm_eval(trained, harness):
    from lm_eval.api.instance import Instance

    model, tokenizer = trained
    documents = english_documents("test")
    ours = bits_per_byte(model, tokenizer, documents, max_length=32)
    requests = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(documents)]
    loglikelihoods = harness.loglikelihood_rolling(requests, disable_tqdm=True)
    theirs = -sum(loglikelihoods) / sum(len(d.encode("utf-8")) for d in documents) / math.log(2)
    gap = abs(ours["bits_per_byte"] - theirs) / theirs
    print(f"bits per byte on the test plays: ours {ours['bits_per_byte']:.8f}, lm-eval {theirs:.8f}, relative gap {gap:.1e}")
    assert ours["bits_per_byte"] < 4.5  # trained: well below the ~5 bits of a uniform guess over 512 tokens
    assert ours["bits_per_byte"] == pytest.approx(theirs, rel=0.005)
    assert ours["loglikelihood"] == pytest.approx(sum(loglikelihoods), rel=1e-5)


def test_choice_loglikelihoods_equal_lm_eval(trained, harness):
    from lm_eval.api.instance import Instance

    model, tokenizer = trained
    examples = make_examples("multiple_choice", 1, "test", 20)
    pairs = [(e.prompt, ANSWER_DELIMITER + choice) for e in examples for choice in e.choices]
    ours = [ll for lls in choice_loglikelihoods(model, tokenizer, examples, batch_size=7) for ll in lls]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    theirs = [ll for ll, _ in harness.loglikelihood(requests, disable_tqdm=True)]
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-5)
