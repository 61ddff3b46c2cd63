"""Paired comparisons of models on the same test items: per-item scores and bootstrap intervals.

Two models scored on the same items (blocks of test text, test problems) are compared item by item: the
resamples pick the same items for both, so the interval of their difference is far tighter than two
separate intervals would allow. Intervals are 95% percentile intervals over BOOTSTRAP_SAMPLES resamples
drawn with a fixed seed, so a report is reproducible.

- Text: the test documents cut into blocks of ~2,000 characters at blank lines, each scored on its own
  with shared.evaluation's rolling bits per byte (a block's first tokens lose the context before it, so
  the pooled block figure sits slightly above the whole-document one).
- Tasks: greedy answers judged one by one, with shared.evaluation's generation and answer extraction; a
  multiple-choice problem is right where its answer has the highest log-likelihood (lm-eval's acc).
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from shared.data.tasks import make_examples
from shared.data.text import english_documents
from shared.evaluation import argmax, bits_per_byte, choice_loglikelihoods, exact_match_flags

BLOCK_CHARS = 2_000
BOOTSTRAP_SAMPLES = 2_000
BOOTSTRAP_SEED = 0
GENERATION_BATCH = 64
LOG2 = 0.6931471805599453

Task = tuple[str, int, int]  # (suite, level, number of problems)


@dataclass
class TextBlocks:
    """Per-block log-likelihood (nats) and byte counts of one model on the test text."""

    loglikelihood: list[float]
    n_bytes: list[int]


@dataclass
class ItemScores:
    """One model's per-item scores, what a paired comparison resamples: its text blocks (None where no text
    is measured) and one flag per problem under each key (a task, or an area pooling tasks)."""

    blocks: TextBlocks | None
    correct: dict[Any, list[bool]]


def text_blocks(split: str = "test") -> list[str]:
    blocks = []
    for document in english_documents(split):
        current = ""
        for paragraph in document.split("\n\n"):
            current = f"{current}\n\n{paragraph}" if current else paragraph
            if len(current) >= BLOCK_CHARS:
                blocks.append(current)
                current = ""
        if current:
            blocks.append(current)
    return blocks


def score_blocks(model, tokenizer, blocks: list[str]) -> TextBlocks:
    scored = [bits_per_byte(model, tokenizer, [block]) for block in blocks]
    return TextBlocks([s["loglikelihood"] for s in scored], [s["n_bytes"] for s in scored])


def task_correctness(model, tokenizer, tasks: Sequence[Task], max_new_tokens: int, split: str = "test",
                     seed: int = 0) -> dict[tuple[str, int], list[bool]]:
    """One flag per problem of each task, in make_examples' order, so two models compare problem by problem."""
    correct = {}
    for suite, level, n in tasks:
        examples = make_examples(suite, level, split, n, seed)
        if examples[0].choices:
            scores = choice_loglikelihoods(model, tokenizer, examples)
            correct[suite, level] = [argmax(lls) == e.label for lls, e in zip(scores, examples, strict=True)]
        else:
            correct[suite, level] = exact_match_flags(model, tokenizer, examples, max_new_tokens, GENERATION_BATCH)
    return correct


def paired_bootstrap(statistic: Callable[..., float], *sizes: int) -> tuple[float, float, float]:
    """statistic over all items and its 95% percentile interval over resamples with replacement.

    One size per item set (blocks, each task's problems): statistic receives one list of picked indices per
    set, each resampled on its own. The resamples are the same for every call, so paired statistics see
    the same items for both models."""
    rng = random.Random(BOOTSTRAP_SEED)
    draws = sorted(statistic(*([rng.randrange(n) for _ in range(n)] for n in sizes)) for _ in range(BOOTSTRAP_SAMPLES))
    return statistic(*(list(range(n)) for n in sizes)), draws[int(0.025 * len(draws))], draws[int(0.975 * len(draws)) - 1]


def block_bpb(blocks: TextBlocks, picks: list[int]) -> float:
    """Bits per byte pooled over the picked blocks."""
    return -sum(blocks.loglikelihood[i] for i in picks) / sum(blocks.n_bytes[i] for i in picks) / LOG2


def bootstrap_bpb(a: TextBlocks, b: TextBlocks | None = None) -> tuple[float, float, float]:
    """bpb(a) over all blocks (or bpb(a) - bpb(b)) and its 95% interval over resampled blocks."""
    return paired_bootstrap(lambda picks: block_bpb(a, picks) - (block_bpb(b, picks) if b is not None else 0.0),
                            len(a.n_bytes))


def correct_differences(a: Sequence[bool], b: Sequence[bool]) -> list[int]:
    """Per problem: +1 where only a is right, -1 where only b is, 0 where they agree."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same problems for both models, got {len(a)} and {len(b)}")
    return [int(x) - int(y) for x, y in zip(a, b, strict=True)]


def bootstrap_accuracy_difference(a: Sequence[bool], b: Sequence[bool]) -> tuple[float, float, float]:
    """accuracy(a) - accuracy(b) on the same problems and its 95% interval over resampled problems."""
    difference = correct_differences(a, b)
    return paired_bootstrap(lambda picks: sum(difference[i] for i in picks) / len(picks), len(difference))
