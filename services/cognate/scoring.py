"""Cognate's measured table: each model's speciality scores on the test split, with 95% intervals.

- text: bits per byte of the English test text, scored by shared.evaluation (lm-eval's rolling windows).
  Its interval comes from a bootstrap over blocks of that text (~2,000 characters, cut at blank lines,
  each scored on its own), resampled with a fixed seed; the difference between two models uses the same
  resampled blocks for both (paired), which is far tighter than comparing two separate intervals.
- reasoning: exact match pooled over the level-1 reasoning suites; tools: exact match on level-2
  calculator calls; both with Wilson intervals. Easy arithmetic (level 1) is also reported alone, beside
  the majority baseline (always answering the most frequent training answer), the "chance" of exact match.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from shared.data.tasks import make_examples
from shared.data.text import english_documents
from shared.evaluation import EvalSuite, bits_per_byte, evaluate, wilson_interval

EASY_ARITHMETIC = ("arithmetic", 1, 43)  # the whole level-1 test pool
REASONING_TASKS = (EASY_ARITHMETIC, ("sequence", 1, 100), ("modular", 1, 100), ("word_problems", 1, 100))
TOOL_TASKS = (("tool_calls", 2, 150),)
BLOCK_CHARS = 2_000
BOOTSTRAP_SAMPLES = 2_000
BOOTSTRAP_SEED = 0
LOG2 = 0.6931471805599453


@dataclass
class TextBlocks:
    """Per-block log-likelihood (nats) and byte counts of one model on the test text."""

    loglikelihood: list[float]
    n_bytes: list[int]


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


def _bpb(blocks: TextBlocks, picks: list[int]) -> float:
    return -sum(blocks.loglikelihood[i] for i in picks) / sum(blocks.n_bytes[i] for i in picks) / LOG2


def bootstrap_bpb(a: TextBlocks, b: TextBlocks | None = None) -> tuple[float, float, float]:
    """bpb(a) over all blocks (or bpb(a) - bpb(b)) and its 95% percentile interval over resampled blocks."""
    n = len(a.n_bytes)

    def statistic(picks: list[int]) -> float:
        return _bpb(a, picks) - (_bpb(b, picks) if b is not None else 0.0)

    rng = random.Random(BOOTSTRAP_SEED)
    draws = sorted(statistic([rng.randrange(n) for _ in range(n)]) for _ in range(BOOTSTRAP_SAMPLES))
    return statistic(list(range(n))), draws[int(0.025 * len(draws))], draws[int(0.975 * len(draws)) - 1]


def majority_baseline(suite: str, level: int, n_test: int, seed: int = 0) -> float:
    """Exact match of always answering the most frequent answer among the training problems."""
    train_answers = Counter(e.answer for e in make_examples(suite, level, "train", 150, seed))
    answer = train_answers.most_common(1)[0][0]
    test = make_examples(suite, level, "test", n_test, seed)
    return sum(e.answer == answer for e in test) / len(test)


def _pooled(table: dict, tasks: tuple[tuple[str, int, int], ...]) -> dict[str, float]:
    correct = sum(round(table[f"{suite}.{level}.exact_match"] * n) for suite, level, n in tasks)
    total = sum(n for _, _, n in tasks)
    low, high = wilson_interval(correct, total)
    return {"exact_match": correct / total, "ci_low": low, "ci_high": high, "n": total}


def score_model(model, tokenizer, blocks: list[str]) -> tuple[dict, TextBlocks]:
    """The speciality table of one model, and its per-block text scores for paired comparisons."""
    suite = EvalSuite(text_split="test", tasks=REASONING_TASKS + TOOL_TASKS, split="test")
    table = evaluate(model, tokenizer, suite)
    scored_blocks = score_blocks(model, tokenizer, blocks)
    block_bpb, low, high = bootstrap_bpb(scored_blocks)
    row = {
        "text": {"bits_per_byte": table["text.bits_per_byte"], "block_bits_per_byte": block_bpb,
                 "block_ci_low": low, "block_ci_high": high,
                 "n_blocks": len(blocks), "max_length": table["text.max_length"]},
        "reasoning": _pooled(table, REASONING_TASKS),
        "tools": _pooled(table, TOOL_TASKS),
        "arithmetic_easy": {k.removeprefix("arithmetic.1."): v for k, v in table.items() if k.startswith("arithmetic.1.")},
        "tasks": {k: v for k, v in table.items() if k.endswith(".exact_match")},
    }
    return row, scored_blocks
