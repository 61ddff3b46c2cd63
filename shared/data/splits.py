"""The four splits every generated problem and every English work belongs to, and the seal on the last one.

- train: what models learn from.
- validation: what searches, early stopping and tuning read.
- test: development reports and tests; it has steered development, so its intervals are optimistic.
- final: read only by the pipeline's final report and the headline benchmark, inside `unsealed_final`.
  Every reader of problems or text (make_examples, training_stream, english_documents, a scorecard spec)
  calls check_readable first, so a phase config, a search or an eval suite that asks for the final split
  is refused with FinalSplitSealed. Once a number measured on it has been looked at, the design may no
  longer change to move it.

A problem's split is a hash of its canonical key (shared.data.tasks), never of its prompt text: two
prompts that are the same problem ("12 + 53" and "53 + 12") always share a split.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import itertools
from collections.abc import Iterator

SPLITS = ("train", "validation", "test", "final")
# Percent of the hash space given to each split, in SPLITS order. Test and final get 15% each so that every
# headline task keeps 300 distinct problems in both (tests/unit/test_data_tasks.py checks it).
SPLIT_PERCENT = (60, 10, 15, 15)
FINAL = "final"

# Who has unsealed the final split in this context (None: nobody); a ContextVar so that a reader in one
# thread or task cannot open it for another.
_final_reader: contextvars.ContextVar[str | None] = contextvars.ContextVar("final_reader", default=None)


class FinalSplitSealed(ValueError):
    """Something other than the final report or the headline benchmark asked for the final split (a ValueError,
    so a config that asks for it fails validation like any other bad value)."""


def split_of(key: str) -> str:
    """The split a problem (or work) belongs to, from the SHA-256 of its canonical key."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100
    for split, upper in zip(SPLITS, itertools.accumulate(SPLIT_PERCENT), strict=True):
        if bucket < upper:
            return split
    raise AssertionError("unreachable")


def check_split(split: str) -> None:
    """A ValueError for a split name that is not one of SPLITS."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def check_readable(split: str) -> None:
    """Raise unless `split` may be read here: any known split but the final one, which needs unsealed_final."""
    check_split(split)
    if split == FINAL and _final_reader.get() is None:
        raise FinalSplitSealed(
            "the final split is sealed: only the pipeline's final report and the headline benchmark read it "
            "(inside shared.data.splits.unsealed_final); search, tune and report on 'validation' or 'test'"
        )


def final_reader() -> str | None:
    """The reader that unsealed the final split in this context, or None."""
    return _final_reader.get()


@contextlib.contextmanager
def unsealed_final(reader: str) -> Iterator[None]:
    """Let this context read the final split; `reader` names who does (recorded in what it reports)."""
    if not reader.strip():
        raise ValueError("unsealed_final needs the name of its reader")
    token = _final_reader.set(reader)
    try:
        yield
    finally:
        _final_reader.reset(token)
