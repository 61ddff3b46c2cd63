"""The skills phases train on, as named sources of text: English text, reasoning tasks, calculator calls.

Every phase that trains draws from these sources by weight (a mix), so that what Cognate teaches is what
later phases keep training: a phase that drops a source lets its skill decay (BitNet trained without tool
calls once erased them). The reasoning source draws level-1 problems of the reasoning suites; the tools
source draws calculator requests of levels 1 and 2, worked through the calculator (call, result, answer),
the result read-only: no loss is taken on text the model never writes.
"""
from __future__ import annotations

from itertools import islice

from shared.calculator import result_spans
from shared.data.tasks import format_for_training, training_stream
from shared.data.text import english_documents
from shared.training import Row, encode_texts

SKILLS = ("text", "reasoning", "tools")
# Easy arithmetic weighs four times the others: every model, whatever its mix, must learn it well above
# chance, and at weight 2 the base (5% exact match) and the tools specialist (4%) had not.
REASONING_SUITES = {"arithmetic": 4.0, "sequence": 1.0, "modular": 1.0, "word_problems": 1.0}
REASONING_LEVELS = (1,)
TOOL_SUITES = {"tool_calls": 1.0}
TOOL_LEVELS = (1, 2)


def check_mix(mix: dict[str, float]) -> dict[str, float]:
    """A ValueError for a mix naming an unknown skill or weighing nothing."""
    if unknown := set(mix) - set(SKILLS):
        raise ValueError(f"unknown sources {sorted(unknown)}; known: {SKILLS}")
    if not any(weight > 0 for weight in mix.values()):
        raise ValueError(f"the mix {mix} gives no source a positive weight")
    return mix


def task_texts(source: str, split: str, n: int, seed: int, levels: tuple[int, ...] | None = None) -> list[str]:
    """n formatted examples of a task source ("reasoning" or "tools"), with repetition; at the source's own
    levels unless `levels` says others (Forge's curriculum feeds harder reasoning)."""
    suites, own_levels = {"reasoning": (REASONING_SUITES, REASONING_LEVELS), "tools": (TOOL_SUITES, TOOL_LEVELS)}[source]
    levels = levels or own_levels
    return [format_for_training(e) for e in islice(training_stream(suites, levels, split, seed), n)]


def text_documents(split: str, max_chars: int | None = None) -> list[str]:
    """The split's English documents in their fixed order, cut after max_chars characters in all if set."""
    documents = english_documents(split)
    if max_chars is None:
        return documents
    kept = []
    for document in documents:
        if max_chars <= 0:
            break
        kept.append(document[:max_chars])
        max_chars -= len(kept[-1])
    return kept


def skill_texts(split: str, task_examples: int, seed: int, text_chars: int | None = None) -> dict[str, list[str]]:
    return {
        "text": text_documents(split, text_chars),
        "reasoning": task_texts("reasoning", split, task_examples, seed),
        "tools": task_texts("tools", split, task_examples, seed),
    }


def skill_rows(tokenizer, split: str, task_examples: int, seq_len: int, seed: int,
               text_chars: int | None = None) -> dict[str, list[Row]]:
    """Token rows of every skill for one split ("train" to learn from, "validation" for held-out curves);
    calculator results are read-only (shared.training): the runtime writes them, the model never does."""
    texts = skill_texts(split, task_examples, seed, text_chars)
    return {name: encode_texts(tokenizer, documents, seq_len, read_only=result_spans) for name, documents in texts.items()}
