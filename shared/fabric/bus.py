"""The event bus seen by the runtime: publish records, consume them one at a time, commit each.

Two backends: kafka_bus.KafkaBus (aiokafka, the services) and memory_bus.InMemoryBus (embedded mode and
unit tests). A consumer hands one record at a time to a handler and commits offset + 1 only after the
handler returns, so a crash mid-handler means redelivery, never loss (the runtime is idempotent).
"""
from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers = field(default_factory=list)

    def header(self, name: str) -> bytes | None:
        return next((value for key, value in self.headers if key == name), None)


Handler = Callable[[Record], Awaitable[None]]


class Consumer(ABC):
    """Records of some topics for one consumer group."""

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    @abstractmethod
    async def next(self, timeout_s: float) -> Record | None:
        """The next record, or None if none came within timeout_s. Not committed: call commit()."""

    @abstractmethod
    async def commit(self, record: Record) -> bool:
        """Commit record.offset + 1; False if this consumer no longer owns the partition."""

    async def run(self, handler: Handler, stop: asyncio.Event, poll_s: float = 0.5) -> None:
        """Handle records one at a time until `stop` is set; the current record always finishes."""
        while not stop.is_set():
            record = await self.next(poll_s)
            if record is None:
                continue
            await self.handle(record, handler)

    async def handle(self, record: Record, handler: Handler) -> None:
        await handler(record)
        await self.commit(record)


class Bus(ABC):
    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    @abstractmethod
    async def publish(self, topic: str, value: bytes, *, key: str, headers: Headers | None = None) -> None:
        """Publish and wait for the broker's acknowledgement."""

    @abstractmethod
    def consumer(self, topics: list[str], group: str) -> Consumer:
        """A consumer of `topics` in consumer group `group`, reading from the earliest uncommitted record."""

    async def ensure_topics(self, topics: list[str]) -> None:
        """Create the topics if the backend needs them to exist before consuming."""
