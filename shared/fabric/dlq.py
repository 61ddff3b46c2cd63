"""Dead letters: events a phase gave up on, kept with headers saying where they came from and why.

Headers added to the original record's own (the value and key are kept byte for byte):
    x-agentforge-original-topic / -partition / -offset   where the event was consumed
    x-agentforge-reason    a FailureReason, e.g. "sha256_mismatch"
    x-agentforge-error     the error message
    x-agentforge-attempts  how many times the phase tried
    x-agentforge-phase     the phase that gave up
    x-agentforge-failed-at when, in Unix milliseconds (the failing service's clock)
Redrive republishes selected dead letters (by run, reason or offset) to their original topic once the
cause is fixed; purge drops letters nobody will redrive. Kafka topics are append-only, so both settle a
letter by appending a settlement record (empty value, x-agentforge-settles = "<partition>:<offset>" of the
letter, x-agentforge-settled-as = redriven | purged), and listing leaves settled letters out: each letter
is redriven at most once. A redrive acts on the letters listed when it began, so a letter that fails
again (a new letter) waits for the next redrive instead of looping between the phase and this topic.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from shared.fabric.bus import Bus, Headers, Record
from shared.fabric.topics import Topics

HEADER_PREFIX = "x-agentforge-"
ORIGINAL_TOPIC = HEADER_PREFIX + "original-topic"
ORIGINAL_PARTITION = HEADER_PREFIX + "original-partition"
ORIGINAL_OFFSET = HEADER_PREFIX + "original-offset"
REASON = HEADER_PREFIX + "reason"
ERROR = HEADER_PREFIX + "error"
ATTEMPTS = HEADER_PREFIX + "attempts"
PHASE = HEADER_PREFIX + "phase"
FAILED_AT = HEADER_PREFIX + "failed-at"
SETTLES = HEADER_PREFIX + "settles"
SETTLED_AS = HEADER_PREFIX + "settled-as"
MAX_ERROR_BYTES = 4000


@dataclass(frozen=True)
class DeadLetter:
    record: Record  # as read from the dead-letter topic
    original_topic: str
    original_partition: int
    original_offset: int
    reason: str
    error: str
    attempts: int
    phase: str
    failed_at_ms: int  # 0 when unknown

    @classmethod
    def from_record(cls, record: Record) -> DeadLetter:
        def text(name: str) -> str:
            return (record.header(name) or b"").decode("utf-8", "replace")

        return cls(
            record=record,
            original_topic=text(ORIGINAL_TOPIC),
            original_partition=int(text(ORIGINAL_PARTITION) or -1),
            original_offset=int(text(ORIGINAL_OFFSET) or -1),
            reason=text(REASON),
            error=text(ERROR),
            attempts=int(text(ATTEMPTS) or 0),
            phase=text(PHASE),
            failed_at_ms=int(text(FAILED_AT) or 0),
        )

    @property
    def run_id(self) -> str:
        return (self.record.key or b"").decode("utf-8", "replace")

    @property
    def letter_id(self) -> str:
        """Where the letter is on the dead-letter topic: "<partition>:<offset>"."""
        return f"{self.record.partition}:{self.record.offset}"


@dataclass(frozen=True)
class LetterFilter:
    """Which letters a redrive or purge takes; an empty filter takes all. `offset` is a letter id
    ("<partition>:<offset>" on the dead-letter topic) or a bare offset, matched on any partition."""

    run_id: str = ""
    reason: str = ""
    offset: str = ""

    def __call__(self, letter: DeadLetter) -> bool:
        if self.offset and self.offset not in (letter.letter_id, str(letter.record.offset)):
            return False
        return (not self.run_id or letter.run_id == self.run_id) and (not self.reason or letter.reason == self.reason)


def _original_headers(headers: Headers) -> Headers:
    """The record's own headers, without any dead-letter header an earlier failure added."""
    return [(name, value) for name, value in headers if not name.startswith(HEADER_PREFIX)]


def dead_letter_headers(record: Record, *, reason: str, error: str, attempts: int, phase: str) -> Headers:
    return _original_headers(record.headers) + [
        (ORIGINAL_TOPIC, record.topic.encode()),
        (ORIGINAL_PARTITION, str(record.partition).encode()),
        (ORIGINAL_OFFSET, str(record.offset).encode()),
        (REASON, reason.encode()),
        (ERROR, error.encode("utf-8", "replace")[:MAX_ERROR_BYTES]),
        (ATTEMPTS, str(attempts).encode()),
        (PHASE, phase.encode()),
        (FAILED_AT, str(int(time.time() * 1000)).encode()),
    ]


async def send_to_dead_letters(
    bus: Bus, topics: Topics, record: Record, *, reason: str, error: str, attempts: int, phase: str
) -> None:
    headers = dead_letter_headers(record, reason=reason, error=error, attempts=attempts, phase=phase)
    key = (record.key or b"").decode("utf-8", "replace")
    await bus.publish(topics.dlq, record.value or b"", key=key, headers=headers)


async def list_dead_letters(
    bus: Bus, topics: Topics = Topics(), idle_s: float = 5.0, *, include_settled: bool = False
) -> list[DeadLetter]:
    """The dead letters not yet redriven or purged (all of them with include_settled), read from the
    start of the topic with a throwaway group that commits nothing."""
    consumer = bus.consumer([topics.dlq], f"{topics.prefix}-dlq-list-{uuid.uuid4().hex[:8]}")
    await consumer.start()
    letters, settled = [], set()
    try:
        while (record := await consumer.next(idle_s)) is not None:
            if (settles := record.header(SETTLES)) is not None:
                settled.add(settles.decode())
            else:
                letters.append(DeadLetter.from_record(record))
    finally:
        await consumer.stop()
    return [letter for letter in letters if include_settled or letter.letter_id not in settled]


async def _settle(bus: Bus, topics: Topics, letter: DeadLetter, settled_as: str) -> None:
    headers = [(SETTLES, letter.letter_id.encode()), (SETTLED_AS, settled_as.encode())]
    await bus.publish(topics.dlq, b"", key=letter.run_id, headers=headers)


async def redrive_dead_letters(
    bus: Bus, topics: Topics = Topics(), idle_s: float = 5.0, select: LetterFilter = LetterFilter()
) -> list[DeadLetter]:
    """Republish the selected unsettled letters to their original topics and settle them; return them.

    Listing stops when no record arrives for idle_s seconds (on Kafka the first fetch waits for the join).
    """
    redriven = []
    for letter in await list_dead_letters(bus, topics, idle_s):
        if not (select(letter) and letter.original_topic):
            continue
        await bus.publish(letter.original_topic, letter.record.value or b"", key=letter.run_id,
                          headers=_original_headers(letter.record.headers))
        await _settle(bus, topics, letter, "redriven")
        redriven.append(letter)
    return redriven


async def purge_dead_letters(
    bus: Bus, topics: Topics = Topics(), idle_s: float = 5.0, select: LetterFilter = LetterFilter()
) -> list[DeadLetter]:
    """Settle the selected unsettled letters without redriving them; return them."""
    purged = [letter for letter in await list_dead_letters(bus, topics, idle_s) if select(letter)]
    for letter in purged:
        await _settle(bus, topics, letter, "purged")
    return purged
