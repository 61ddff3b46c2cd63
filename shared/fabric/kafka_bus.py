"""The bus over Apache Kafka (aiokafka).

Phases run for minutes, longer than max.poll.interval.ms. While a handler works, the consumer pauses its
partitions and keeps calling getmany(): that returns nothing but keeps the member in the group
(aiokafka counts time inside getmany as not idle), so it is not evicted and another member does not
reprocess the record (aiokafka #848). After the handler it commits the record's offset + 1 explicitly
and resumes. Records are keyed by run id, so one run's events stay ordered within a partition.

A rebalance first revokes every partition of every member (the eager protocol), then assigns them anew.
A record in hand is then held at bus.must_finish() until the assignment: if its partition stays here the
handler goes on; if it moved, the handler is abandoned (the new owner redoes the record). A handler
already past must_finish() is waited for, and its record committed, inside the revocation.
"""
from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import CommitFailedError, IllegalStateError, TopicAlreadyExistsError

from shared.fabric.bus import Bus, Consumer, Delivery, Handler, Headers, Record, start_handler

log = logging.getLogger(__name__)

DEFAULT_PARTITIONS = 3


class KafkaBus(Bus):
    def __init__(
        self,
        bootstrap: str,
        *,
        client_id: str = "agentforge",
        max_poll_interval_ms: int = 300_000,
        session_timeout_ms: int = 10_000,
        partitions: int = DEFAULT_PARTITIONS,
        replication_factor: int = 1,
    ) -> None:
        self.bootstrap, self.client_id = bootstrap, client_id
        self.max_poll_interval_ms, self.session_timeout_ms = max_poll_interval_ms, session_timeout_ms
        self.partitions, self.replication_factor = partitions, replication_factor
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, client_id=self.client_id, acks="all", enable_idempotence=True
        )
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def publish(self, topic: str, value: bytes, *, key: str, headers: Headers | None = None) -> None:
        if self._producer is None:
            raise RuntimeError("KafkaBus.publish before start()")
        await self._producer.send_and_wait(topic, value, key=key.encode(), headers=list(headers or []))

    def consumer(self, topics: list[str], group: str) -> KafkaConsumer:
        return KafkaConsumer(self, topics, group)

    async def ensure_topics(self, topics: list[str]) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, client_id=self.client_id)
        await admin.start()
        try:
            missing = sorted(set(topics) - set(await admin.list_topics()))
            if missing:
                new = [NewTopic(name, self.partitions, self.replication_factor) for name in missing]
                try:
                    await admin.create_topics(new)
                except TopicAlreadyExistsError:
                    pass  # another replica created them first
        finally:
            await admin.close()


class _Rebalance(ConsumerRebalanceListener):
    """While a handler works, partitions assigned by a rebalance stay paused too, and a revoked record in
    hand is abandoned or finished (see the module docstring)."""

    def __init__(self, owner: KafkaConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked) -> None:
        if revoked:
            log.info("partitions revoked: %s", sorted(map(str, revoked)))
        in_hand = self.owner.in_hand
        if in_hand is None:
            return
        delivery, work = in_hand
        record = delivery.record
        if TopicPartition(record.topic, record.partition) not in revoked:
            return
        if delivery.must_finish:
            log.info("finishing %s[%d]@%d before giving its partition up", record.topic, record.partition, record.offset)
            await asyncio.wait([work])
            if not work.cancelled() and work.exception() is None:
                delivery.committed = await self.owner.commit(record)
        else:
            delivery.owned.clear()  # hold it at must_finish() until the assignment says whose it is

    async def on_partitions_assigned(self, assigned) -> None:
        log.info("partitions assigned: %s", sorted(map(str, assigned)))
        if self.owner.working and assigned:
            self.owner.client.pause(*assigned)
        in_hand = self.owner.in_hand
        if in_hand is None or in_hand[0].owned.is_set():
            return
        delivery, work = in_hand
        record = delivery.record
        if TopicPartition(record.topic, record.partition) not in assigned:
            log.info("abandoning %s[%d]@%d: its partition moved to another member", record.topic, record.partition,
                     record.offset)
            delivery.abandoned = True
            work.cancel()
        delivery.owned.set()


class KafkaConsumer(Consumer):
    def __init__(self, bus: KafkaBus, topics: list[str], group: str, hold_poll_ms: int = 200) -> None:
        self.topics, self.group, self.hold_poll_ms = list(topics), group, hold_poll_ms
        self.working = False
        self.in_hand: tuple[Delivery, asyncio.Task] | None = None
        self.client = AIOKafkaConsumer(
            bootstrap_servers=bus.bootstrap,
            client_id=bus.client_id,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=1,
            max_poll_interval_ms=bus.max_poll_interval_ms,
            session_timeout_ms=bus.session_timeout_ms,
            heartbeat_interval_ms=max(bus.session_timeout_ms // 3, 100),
        )

    async def start(self) -> None:
        self.client.subscribe(self.topics, listener=_Rebalance(self))
        await self.client.start()

    async def stop(self) -> None:
        await self.client.stop()  # leaves the group, so its partitions move at once

    async def next(self, timeout_s: float) -> Record | None:
        batch = await self.client.getmany(timeout_ms=int(timeout_s * 1000), max_records=1)
        for messages in batch.values():
            for m in messages:
                return Record(m.topic, m.partition, m.offset, m.key, m.value, list(m.headers or []))
        return None

    async def commit(self, record: Record) -> bool:
        try:
            await self.client.commit({TopicPartition(record.topic, record.partition): record.offset + 1})
            return True
        except (CommitFailedError, IllegalStateError) as error:
            # The partition moved to another member; it will redeliver and find our output already stored.
            log.warning("commit of %s[%d]@%d failed: %s", record.topic, record.partition, record.offset, error)
            return False

    async def handle(self, record: Record, handler: Handler) -> None:
        self.working = True
        self.client.pause(*self.client.assignment())
        delivery, work = self.in_hand = start_handler(record, handler)
        try:
            while not work.done():
                stray = await self.client.getmany(timeout_ms=self.hold_poll_ms)
                for tp, messages in stray.items():  # only if a partition slipped through unpaused
                    self.client.seek(tp, messages[0].offset)
                    self.client.pause(tp)
            if delivery.abandoned:
                return  # the partition's new owner handles the record
            await work
            if not delivery.committed:
                await self.commit(record)
        finally:
            self.in_hand = None
            self.working = False
            self.client.resume(*self.client.assignment())
