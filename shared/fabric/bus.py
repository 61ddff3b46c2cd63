"""The event bus seen by the runtime: publish records, consume them one at a time, commit each.

Two backends: kafka_bus.KafkaBus (aiokafka, the services) and memory_bus.InMemoryBus (embedded mode and
unit tests). A consumer hands one record at a time to a handler and commits offset + 1 only after the
handler returns, so a crash mid-handler means redelivery, never loss (the runtime is idempotent).

While a rebalance moves partitions (another replica joined or left), the handler of the record in hand
goes on with its work, unless the record's partition went to another member: then its consumer abandons
it (cancels it; the new owner redoes the record from the uncommitted offset). The handler calls
`await must_finish()` before it stores or publishes results; that waits while a rebalance is deciding,
and from then on the consumer lets the handler finish and commits before it gives the partition up, so
no two members ever store or publish the same record's results.
"""
from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
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


@dataclass
class Delivery:
    """One record in the hands of a handler, as its consumer tracks it."""

    record: Record
    must_finish: bool = False
    abandoned: bool = False
    committed: bool = False
    owned: asyncio.Event = field(default_factory=asyncio.Event)  # clear while a rebalance decides

    def __post_init__(self) -> None:
        self.owned.set()


_delivery: ContextVar[Delivery | None] = ContextVar("agentforge_delivery", default=None)


async def must_finish() -> None:
    """Called by a handler before it stores or publishes results: from here on it is not abandoned.
    Waits while a rebalance decides who owns the record; raises CancelledError if it went elsewhere."""
    delivery = _delivery.get()
    if delivery is None:
        return
    await delivery.owned.wait()
    if delivery.abandoned:
        raise asyncio.CancelledError(f"{delivery.record.topic}[{delivery.record.partition}] moved to another member")
    delivery.must_finish = True


def start_handler(record: Record, handler: Handler) -> tuple[Delivery, asyncio.Task]:
    """Run handler(record) as a task that sees its Delivery (tasks copy the context they are created in)."""
    delivery = Delivery(record)
    token = _delivery.set(delivery)
    try:
        return delivery, asyncio.ensure_future(handler(record))
    finally:
        _delivery.reset(token)


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
