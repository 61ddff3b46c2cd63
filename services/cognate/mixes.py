"""Cognate's data: three sources (English text, reasoning tasks, tool calls) packed into token rows.

A specialist differs from its siblings by the weights it puts on these sources (its mix), not by
different data code. The reasoning source draws level-1 problems of the reasoning suites; the tools source
draws calculator calls of levels 1 and 2 (copying operands into `<calc>a+b</calc>` generalises to unseen
numbers, so level 2 has a large, clean test pool).
"""
from __future__ import annotations

from itertools import islice

from shared.data.tasks import format_for_training, training_stream
from shared.data.text import english_documents
from shared.training import Row, encode_texts

SOURCES = ("text", "reasoning", "tools")
# Easy arithmetic weighs four times the others: every model, whatever its mix, must learn it well above
# chance, and at weight 2 the base (5% exact match) and the tools specialist (4%) had not.
REASONING_SUITES = {"arithmetic": 4.0, "sequence": 1.0, "modular": 1.0, "word_problems": 1.0}
REASONING_LEVELS = (1,)
TOOL_SUITES = {"tool_calls": 1.0}
TOOL_LEVELS = (1, 2)


def task_texts(source: str, split: str, n: int, seed: int) -> list[str]:
    """n formatted examples of a task source ("reasoning" or "tools"), with repetition."""
    suites, levels = {"reasoning": (REASONING_SUITES, REASONING_LEVELS), "tools": (TOOL_SUITES, TOOL_LEVELS)}[source]
    return [format_for_training(e) for e in islice(training_stream(suites, levels, split, seed), n)]


def text_documents(split: str, limit: int | None) -> list[str]:
    """The split's English documents, the first `limit` of them if set (micro runs)."""
    return english_documents(split)[:limit]


def tokenizer_corpus(task_examples: int, seed: int, text_limit: int | None = None) -> list[str]:
    """What the tokenizer is trained on: the English training text and the task formats."""
    return [
        *text_documents("train", text_limit),
        *task_texts("reasoning", "train", task_examples, seed),
        *task_texts("tools", "train", task_examples, seed),
    ]


def source_rows(
    tokenizer, split: str, task_examples: int, seq_len: int, seed: int, text_limit: int | None = None
) -> dict[str, list[Row]]:
    """Token rows of every source for one split ("train" for training, "validation" for the curves)."""
    return {
        "text": encode_texts(tokenizer, text_documents(split, text_limit), seq_len),
        "reasoning": encode_texts(tokenizer, task_texts("reasoning", split, task_examples, seed), seq_len),
        "tools": encode_texts(tokenizer, task_texts("tools", split, task_examples, seed), seq_len),
    }
