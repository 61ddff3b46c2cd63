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

from collections import Counter
from collections.abc import Sequence

from shared.comparison import ItemScores, bootstrap_bpb, score_blocks, task_correctness
from shared.data.tasks import make_examples
from shared.evaluation import EvalSuite, evaluate, wilson_interval

EASY_ARITHMETIC = ("arithmetic", 1, 300)  # of the 309 test problems
REASONING_TASKS = (EASY_ARITHMETIC, ("sequence", 1, 150), ("modular", 1, 100), ("word_problems", 1, 150))
TOOL_TASKS = (("tool_calls", 2, 200),)
AREAS = {"reasoning": REASONING_TASKS, "tools": TOOL_TASKS}
MAX_NEW_TOKENS = 24  # the longest answer (a level-2 calculator call) is 15 tokens


def majority_baseline(suite: str, level: int, n_test: int, seed: int = 0) -> float:
    """Exact match of always answering the most frequent answer among the training problems."""
    train_answers = Counter(e.answer for e in make_examples(suite, level, "train", 300, seed))
    answer = train_answers.most_common(1)[0][0]
    test = make_examples(suite, level, "test", n_test, seed)
    return sum(e.answer == answer for e in test) / len(test)


def _accuracy(correct: Sequence[bool]) -> dict[str, float | int]:
    low, high = wilson_interval(sum(correct), len(correct))
    return {"exact_match": sum(correct) / len(correct), "ci_low": low, "ci_high": high, "n": len(correct)}


def score_model(model, tokenizer, blocks: list[str]) -> tuple[dict, ItemScores]:
    """The speciality table of one model, and its per-item scores for paired comparisons."""
    text = evaluate(model, tokenizer, EvalSuite(text_split="test", tasks=(), split="test"))
    scored_blocks = score_blocks(model, tokenizer, blocks)
    block_bpb, low, high = bootstrap_bpb(scored_blocks)
    by_task = task_correctness(model, tokenizer, REASONING_TASKS + TOOL_TASKS, MAX_NEW_TOKENS)
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
