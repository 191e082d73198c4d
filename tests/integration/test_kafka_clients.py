"""Produce and consume through the real broker with kafka-python and aiokafka."""

from __future__ import annotations

import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from kafka import KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition

from tests.conftest import TopicFactory

pytestmark = pytest.mark.integration


def _consume(consumer: KafkaConsumer, n: int) -> list[bytes]:
    values: list[bytes] = []
    for _ in range(20):
        for records in consumer.poll(timeout_ms=1000, max_records=n - len(values)).values():
            values.extend(r.value for r in records)
        if len(values) >= n:
            break
    return values


def test_kafka_python_round_trip_with_group_commit_and_resume(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topic = topic_factory("kp", partitions=1)
    group = f"g-{uuid.uuid4().hex[:8]}"
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
    for i in range(20):
        producer.send(topic, key=str(i).encode(), value=f"v{i}".encode())
    producer.flush(timeout=30)
    producer.close()

    def consumer() -> KafkaConsumer:
        return KafkaConsumer(
            topic,
            bootstrap_servers=kafka_bootstrap,
            group_id=group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )

    first = consumer()
    assert _consume(first, 12) == [f"v{i}".encode() for i in range(12)]
    first.commit({TopicPartition(topic, 0): OffsetAndMetadata(12, "", -1)})
    first.close()

    # a new member of the same group resumes exactly after the committed offset
    second = consumer()
    assert _consume(second, 8) == [f"v{i}".encode() for i in range(12, 20)]
    assert second.committed(TopicPartition(topic, 0)) == 12
    second.close()


async def test_aiokafka_round_trip_with_group_commit_and_resume(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topic = topic_factory("aio", partitions=2)
    group = f"g-{uuid.uuid4().hex[:8]}"
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for i in range(30):
            await producer.send(topic, key=str(i % 3).encode(), value=f"{i}".encode())
        await producer.flush()
    finally:
        await producer.stop()

    async def read(n: int) -> list[int]:
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=kafka_bootstrap,
            group_id=group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        got: list[int] = []
        try:
            while len(got) < n:
                batch = await consumer.getmany(timeout_ms=10_000, max_records=n - len(got))
                if not batch:
                    break
                for records in batch.values():
                    got.extend(int(r.value or b"-1") for r in records)
            await consumer.commit()
        finally:
            await consumer.stop()
        return got

    first = await read(18)
    rest = await read(12)
    assert len(first) == 18
    assert sorted(first + rest) == list(range(30))
