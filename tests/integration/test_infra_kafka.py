"""The local Apache Kafka keeps a consumer group's committed offset across consumers."""
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

MESSAGES = [f"message-{index}".encode() for index in range(10)]
READ_FIRST = 4


def _consumer(infra, topic: str, group: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(topic, bootstrap_servers=infra.settings.kafka_bootstrap, group_id=group,
                            enable_auto_commit=False, auto_offset_reset="earliest")


async def test_consumer_group_resumes_from_its_committed_offset(infra):
    infra.require("kafka")
    topic, group = f"infra-test-{uuid.uuid4().hex}", f"infra-test-group-{uuid.uuid4().hex}"
    partition = TopicPartition(topic, 0)

    admin = AIOKafkaAdminClient(bootstrap_servers=infra.settings.kafka_bootstrap)
    await admin.start()
    try:  # created by name: the broker auto-creates no topic
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=infra.settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for message in MESSAGES:
            await producer.send_and_wait(topic, message, partition=0)
    finally:
        await producer.stop()

    first = _consumer(infra, topic, group)
    await first.start()
    try:
        read = [(await first.getone()).value for _ in range(READ_FIRST)]
        await first.commit()
    finally:
        await first.stop()
    assert read == MESSAGES[:READ_FIRST]

    second = _consumer(infra, topic, group)
    await second.start()
    try:
        assert await second.committed(partition) == READ_FIRST
        rest = [(await second.getone()).value for _ in range(len(MESSAGES) - READ_FIRST)]
    finally:
        await second.stop()
    assert rest == MESSAGES[READ_FIRST:]
