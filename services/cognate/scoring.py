"""Cognate's measured table: each model's speciality scores on the test split, with 95% intervals.

- text: bits per byte of the English test text, scored by shared.evaluation (lm-eval's rolling windows).
  Its interval comes from a bootstrap over blocks of that text (~2,000 characters, cut at blank lines,
  each scored on its own), resampled with a fixed seed.
- reasoning: exact match pooled over the level-1 reasoning suites; tools: exact match on level-2
  calculator calls; both with Wilson intervals. Easy arithmetic (level 1, carry-free two-digit addition)
  is also reported alone, beside the majority baseline (always answering the most frequent training
  answer), the "chance" of exact match.
- Two models are compared paired: the same resampled blocks (or problems) for both, so the interval of
  their difference is far tighter than two separate intervals would allow.
"""
from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shared.data.tasks import extract_answer, make_examples
from shared.data.text import english_documents
from shared.evaluation import EvalSuite, bits_per_byte, evaluate, greedy_continuations, wilson_interval

EASY_ARITHMETIC = ("arithmetic", 1, 300)  # of the 309 test problems
REASONING_TASKS = (EASY_ARITHMETIC, ("sequence", 1, 150), ("modular", 1, 100), ("word_problems", 1, 150))
TOOL_TASKS = (("tool_calls", 2, 200),)
AREAS = {"reasoning": REASONING_TASKS, "tools": TOOL_TASKS}
MAX_NEW_TOKENS = 24  # the longest answer (a level-2 calculator call) is 15 tokens
GENERATION_BATCH = 64
BLOCK_CHARS = 2_000
BOOTSTRAP_SAMPLES = 2_000
BOOTSTRAP_SEED = 0
LOG2 = 0.6931471805599453


@dataclass
class TextBlocks:
    """Per-block log-likelihood (nats) and byte counts of one model on the test text."""

    loglikelihood: list[float]
    n_bytes: list[int]


@dataclass
class ItemScores:
    """What paired comparisons need: per-block text scores and per-problem correctness of each area."""

    blocks: TextBlocks
    correct: dict[str, list[bool]]  # area -> one flag per test problem, in a fixed order


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


def paired_bootstrap(statistic: Callable[[list[int]], float], n: int) -> tuple[float, float, float]:
    """statistic over all n items and its 95% percentile interval over items resampled with replacement
    (the same resamples for every call, so paired statistics see the same items for both models)."""
    rng = random.Random(BOOTSTRAP_SEED)
    draws = sorted(statistic([rng.randrange(n) for _ in range(n)]) for _ in range(BOOTSTRAP_SAMPLES))
    return statistic(list(range(n))), draws[int(0.025 * len(draws))], draws[int(0.975 * len(draws)) - 1]


def _bpb(blocks: TextBlocks, picks: list[int]) -> float:
    return -sum(blocks.loglikelihood[i] for i in picks) / sum(blocks.n_bytes[i] for i in picks) / LOG2


def bootstrap_bpb(a: TextBlocks, b: TextBlocks | None = None) -> tuple[float, float, float]:
    """bpb(a) over all blocks (or bpb(a) - bpb(b)) and its 95% interval over resampled blocks."""
    return paired_bootstrap(lambda picks: _bpb(a, picks) - (_bpb(b, picks) if b is not None else 0.0), len(a.n_bytes))


def bootstrap_accuracy_difference(a: Sequence[bool], b: Sequence[bool]) -> tuple[float, float, float]:
    """accuracy(a) - accuracy(b) on the same problems and its 95% interval over resampled problems."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same problems for both models, got {len(a)} and {len(b)}")
    difference = [int(x) - int(y) for x, y in zip(a, b, strict=True)]
    return paired_bootstrap(lambda picks: sum(difference[i] for i in picks) / len(picks), len(difference))


def majority_baseline(suite: str, level: int, n_test: int, seed: int = 0) -> float:
    """Exact match of always answering the most frequent answer among the training problems."""
    train_answers = Counter(e.answer for e in make_examples(suite, level, "train", 300, seed))
    answer = train_answers.most_common(1)[0][0]
    test = make_examples(suite, level, "test", n_test, seed)
    return sum(e.answer == answer for e in test) / len(test)


def _accuracy(correct: Sequence[bool]) -> dict[str, float | int]:
    low, high = wilson_interval(sum(correct), len(correct))
    return {"exact_match": sum(correct) / len(correct), "ci_low": low, "ci_high": high, "n": len(correct)}


def task_correctness(model, tokenizer, tasks: Sequence[tuple[str, int, int]]) -> dict[tuple[str, int], list[bool]]:
    """Greedy answers to each task's test problems (shared.evaluation's generation and extraction), judged
    one by one so that two models can be compared problem by problem."""
    correct = {}
    for suite, level, n in tasks:
        examples = make_examples(suite, level, "test", n)
        generated = greedy_continuations(model, tokenizer, [e.prompt for e in examples], MAX_NEW_TOKENS, GENERATION_BATCH)
        correct[suite, level] = [extract_answer(text) == e.answer for text, e in zip(generated, examples, strict=True)]
    return correct


def score_model(model, tokenizer, blocks: list[str]) -> tuple[dict, ItemScores]:
    """The speciality table of one model, and its per-item scores for paired comparisons."""
    text = evaluate(model, tokenizer, EvalSuite(text_split="test", tasks=(), split="test"))
    scored_blocks = score_blocks(model, tokenizer, blocks)
    block_bpb, low, high = bootstrap_bpb(scored_blocks)
    by_task = task_correctness(model, tokenizer, REASONING_TASKS + TOOL_TASKS)
    by_area = {area: [flag for suite, level, _ in tasks for flag in by_task[suite, level]] for area, tasks in AREAS.items()}
    row = {
        "text": {"bits_per_byte": text["text.bits_per_byte"], "block_bits_per_byte": block_bpb,
                 "block_ci_low": low, "block_ci_high": high,
                 "n_blocks": len(blocks), "max_length": text["text.max_length"]},
        **{area: _accuracy(flags) for area, flags in by_area.items()},
        "arithmetic_easy": _accuracy(by_task[EASY_ARITHMETIC[:2]]),
        "tasks": {f"{suite}.{level}.exact_match": sum(flags) / len(flags) for (suite, level), flags in by_task.items()},
    }
    return row, ItemScores(scored_blocks, by_area)
