"""Dead letters: events a phase gave up on, kept with headers saying where they came from and why.

Headers added to the original record's own (the value and key are kept byte for byte):
    x-agentforge-original-topic / -partition / -offset   where the event was consumed
    x-agentforge-reason    a FailureReason, e.g. "sha256_mismatch"
    x-agentforge-error     the error message
    x-agentforge-attempts  how many times the phase tried
    x-agentforge-phase     the phase that gave up
    x-agentforge-failed-at when, in Unix milliseconds (the failing service's clock)
Redrive republishes dead letters to their original topic once the cause is fixed. It reads with its own
consumer group, so each dead letter is redriven once. A letter that fails again comes back as a new one,
dated after the redrive began: redrive leaves those for the next redrive (uncommitted), or a cause that
is not fixed would loop between the phase and the dead-letter topic.
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


def dead_letter_headers(record: Record, *, reason: str, error: str, attempts: int, phase: str) -> Headers:
    kept = [(name, value) for name, value in record.headers if not name.startswith(HEADER_PREFIX)]
    return kept + [
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


async def list_dead_letters(bus: Bus, topics: Topics = Topics(), idle_s: float = 5.0) -> list[DeadLetter]:
    """Every dead letter from the start of the topic (reads with a throwaway group, commits nothing)."""
    consumer = bus.consumer([topics.dlq], f"{topics.prefix}-dlq-list-{uuid.uuid4().hex[:8]}")
    await consumer.start()
    letters = []
    try:
        while (record := await consumer.next(idle_s)) is not None:
            letters.append(DeadLetter.from_record(record))
    finally:
        await consumer.stop()
    return letters


async def redrive_dead_letters(bus: Bus, topics: Topics = Topics(), idle_s: float = 5.0) -> list[DeadLetter]:
    """Republish every dead letter not redriven before to its original topic; return them.

    Stops when no letter arrives for idle_s seconds (on Kafka the first fetch waits for the group join).
    """
    began_ms = int(time.time() * 1000)
    consumer = bus.consumer([topics.dlq], f"{topics.prefix}-dlq-redrive")
    await consumer.start()
    redriven = []
    try:
        while (record := await consumer.next(idle_s)) is not None:
            letter = DeadLetter.from_record(record)
            if letter.failed_at_ms >= began_ms:
                continue  # failed again during this redrive: later letters of its partition are newer still
            if letter.original_topic:
                headers = [(name, value) for name, value in record.headers if not name.startswith(HEADER_PREFIX)]
                await bus.publish(letter.original_topic, record.value or b"", key=letter.run_id, headers=headers)
                redriven.append(letter)
            await consumer.commit(record)
    finally:
        await consumer.stop()
    return redriven
