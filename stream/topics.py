"""Create the worker's topics up front, with the configured partition count."""

from __future__ import annotations

import logging

from stream.settings import StreamSettings

__all__ = ["ensure_topics", "partition_for"]

logger = logging.getLogger(__name__)


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner picks for ``key`` (murmur2, like Java's).

    Examples
    --------
    >>> partition_for(b"imp-1", 4) in range(4)
    True
    """
    from kafka.partitioner.default import murmur2

    return int((murmur2(key) & 0x7FFFFFFF) % partitions)


def ensure_topics(settings: StreamSettings) -> list[str]:
    """Create the input, tick, samples, dead-letter and changelog topics that do not exist yet.

    Existing topics are left alone; one with a partition count other than the configured one
    is reported, since co-partitioning needs all inputs to agree.
    """
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    names = [*settings.input_topics, settings.ticks_topic]
    names += [settings.samples_topic, settings.dead_letters_topic, settings.changelog_topic]
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="mtl-topics")
    try:
        existing = set(admin.list_topics())
        missing = [n for n in names if n not in existing]
        if missing:
            new = [NewTopic(n, settings.partitions, 1) for n in missing]
            if settings.changelog_topic in missing:
                new[missing.index(settings.changelog_topic)] = NewTopic(
                    settings.changelog_topic,
                    settings.partitions,
                    1,
                    topic_configs={"cleanup.policy": "compact"},
                )
            try:
                admin.create_topics(new)
                logger.info("created topics %s with %s partitions", missing, settings.partitions)
            except TopicAlreadyExistsError:
                pass  # another worker starting at the same time created them
        _check_partitions(admin, [n for n in names if n in existing], settings.partitions)
        return missing
    finally:
        admin.close()


def _check_partitions(admin: object, names: list[str], partitions: int) -> None:
    if not names:
        return
    described = admin.describe_topics(names)  # type: ignore[attr-defined]
    for topic in described:
        count = len(topic.get("partitions", ()))
        if count != partitions:
            logger.warning(
                "topic %s has %s partitions, MTL_TOPIC_PARTITIONS=%s: inputs must be "
                "co-partitioned (same count) for the join to be correct",
                topic.get("name"),
                count,
                partitions,
            )
