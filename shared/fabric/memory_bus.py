"""In-process bus for embedded mode and unit tests: one partition per topic, offsets per group.

It keeps the Kafka semantics the runtime relies on: records stay after consumption, a group resumes
from its committed offset, and an uncommitted record is delivered again to the next consumer.
"""
from __future__ import annotations

import asyncio
from collections import defaultdict

from shared.fabric.bus import Bus, Consumer, Headers, Record


class InMemoryBus(Bus):
    def __init__(self) -> None:
        self.records: dict[str, list[Record]] = defaultdict(list)
        self.committed: dict[tuple[str, str], int] = defaultdict(int)  # (group, topic) -> next offset
        self.published = asyncio.Condition()

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def publish(self, topic: str, value: bytes, *, key: str, headers: Headers | None = None) -> None:
        async with self.published:
            log = self.records[topic]
            log.append(Record(topic, 0, len(log), key.encode(), value, list(headers or [])))
            self.published.notify_all()

    def consumer(self, topics: list[str], group: str) -> InMemoryConsumer:
        return InMemoryConsumer(self, topics, group)


class InMemoryConsumer(Consumer):
    def __init__(self, bus: InMemoryBus, topics: list[str], group: str) -> None:
        self.bus, self.topics, self.group = bus, list(topics), group
        # Delivered but not yet committed, per topic: the next record to hand out.
        self._position: dict[str, int] = {}

    async def start(self) -> None:
        self._position = {topic: self.bus.committed[(self.group, topic)] for topic in self.topics}

    async def stop(self) -> None:
        pass

    def _take(self) -> Record | None:
        for topic in self.topics:
            log, position = self.bus.records[topic], self._position[topic]
            if position < len(log):
                self._position[topic] = position + 1
                return log[position]
        return None

    async def next(self, timeout_s: float) -> Record | None:
        async with self.bus.published:  # checked under the lock so no publish slips between take and wait
            record = self._take()
            if record is None:
                try:
                    await asyncio.wait_for(self.bus.published.wait(), timeout_s)
                except TimeoutError:
                    return None
                record = self._take()
            return record

    async def commit(self, record: Record) -> bool:
        key = (self.group, record.topic)
        self.bus.committed[key] = max(self.bus.committed[key], record.offset + 1)
        return True
