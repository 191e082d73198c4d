"""The faust engine's guard readers against the real broker: skipped ranges, group offsets."""

from __future__ import annotations

import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition

from stream.gaps import CommittedReader, RangeReader
from tests.conftest import TopicFactory

pytestmark = pytest.mark.integration


async def test_reads_exactly_the_requested_range_of_one_partition(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topic = topic_factory("gaps", partitions=2)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
    for i in range(300):
        producer.send(topic, key=b"k%d" % i, value=b"v%d" % i, partition=i % 2)
    producer.flush(timeout=30)
    producer.close()
    reader = RangeReader(kafka_bootstrap, poll_ms=200)
    try:
        got = await reader.read(topic, 1, 40, 47)
        assert [r.offset for r in got] == list(range(40, 47))
        # partition 1 holds the odd records: offset n is record 2n + 1
        assert [r.value for r in got] == [b"v%d" % (2 * o + 1) for o in range(40, 47)]
        # the reader is reused for another partition and a range that ends at the log end
        tail = await reader.read(topic, 0, 145, 150)
        assert [(r.offset, r.key) for r in tail] == [(o, b"k%d" % (2 * o)) for o in range(145, 150)]
        assert await reader.read(topic, 0, 10, 10) == []
    finally:
        await reader.stop()


async def test_committed_reader_reads_a_groups_offsets_and_survives_an_unknown_group(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topic = topic_factory("committed", partitions=2)
    group = f"g-{uuid.uuid4().hex[:8]}"
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group)
    consumer.commit(
        {
            TopicPartition(topic, 0): OffsetAndMetadata(17, "", -1),
            TopicPartition(topic, 1): OffsetAndMetadata(4, "", -1),
        }
    )
    consumer.close()
    reader = CommittedReader(kafka_bootstrap)
    try:
        assert await reader.read(group) == {(topic, 0): 17, (topic, 1): 4}
        assert await reader.read(f"{group}-none") == {}
    finally:
        await reader.stop()
