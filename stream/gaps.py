"""Guards the faust engine against records faust skips or delivers twice.

faust-streaming 0.15.3 can lose track of its position around a recovery: after a restart it
may deliver a partition's records, seek back to the committed offsets while the fetcher still
holds records from before the seek, and then skip a few offsets or replay many (seen in
``test_sigkill_mid_stream_loses_nothing[faust]``; upstream faust-streaming/faust#596 and #606,
where a single skipped offset is even committed past). The agent cannot ask faust for the
records it skipped, so:

- :class:`OffsetGuard` remembers, per input topic-partition, the next offset the worker
  expects. A record behind it was already applied in this assignment and is skipped (faust
  still acks it); a record beyond it means faust skipped ``[expected, offset)``.
- :class:`RangeReader` reads such a range straight from Kafka with a consumer of its own (no
  group), so the worker applies the skipped records, in order, before the one that revealed the
  gap. Offsets that hold no record (transaction markers, compaction) simply yield nothing.
- faust's commits can stall after such a recovery: a commit refused during the rebalance is
  still recorded as done in faust's bookkeeping, so faust never commits those offsets again.
  :class:`CommittedReader` reads the group's offsets from the broker, and
  :meth:`OffsetGuard.stalled` tells when one is still behind, seconds later, what the worker
  had applied and made durable; the engine then commits the expected offset itself.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

__all__ = ["Admission", "CommittedReader", "OffsetGuard", "RangeReader"]

logger = logging.getLogger(__name__)


class Admission(NamedTuple):
    """What to do with one delivered record."""

    apply: bool  # False: a replay of a record already applied in this assignment
    missing_from: int | None  # not None: read [missing_from, offset) first, faust skipped them


@dataclass
class OffsetGuard:
    """The next expected offset of every input topic-partition seen since its assignment."""

    expected: dict[tuple[str, int], int] = field(default_factory=dict)
    first: dict[tuple[str, int], int] = field(default_factory=dict)  # first offset applied
    stall_s: float = 3.0  # how long faust may take to commit an applied offset (3 commits)
    _marks: dict[tuple[str, int], tuple[int, float]] = field(default_factory=dict)

    def admit(self, topic: str, partition: int, offset: int) -> Admission:
        """Decide on the record at ``offset`` and advance the expectation when it applies."""
        tp = (topic, partition)
        want = self.expected.get(tp)
        if want is not None and offset < want:
            return Admission(apply=False, missing_from=None)
        self.expected[tp] = offset + 1
        if want is None:
            self.first[tp] = offset
        missing = want if want is not None and offset > want else None
        return Admission(apply=True, missing_from=missing)

    def stalled(self, tp: tuple[str, int], committed: int | None, now: float) -> range | None:
        """The offsets to commit when the group's ``committed`` offset lags behind.

        Call it after a flush, when every offset below ``expected`` is applied and durable.
        It marks the expected offset and returns ``range(committed, expected)`` when, ``stall_s``
        later, ``committed`` has still not reached that mark (faust commits every second; after
        a bad recovery it stands still or crawls one offset per commit). None otherwise, and
        never for offsets before the first one applied in this assignment (not known applied).
        """
        want = self.expected.get(tp)
        if committed is None or want is None or committed >= want:
            self._marks.pop(tp, None)
            return None
        mark = self._marks.get(tp)
        if mark is None or committed >= mark[0]:
            self._marks[tp] = (want, now)  # caught up with the last mark: set a new one
            return None
        if now - mark[1] < self.stall_s:
            return None
        self._marks[tp] = (want, now)
        return range(committed, want) if committed >= self.first[tp] else None

    def retain(self, owned: set[int]) -> None:
        """Keep the expectations of the partitions still owned; the others start afresh."""
        for tp in [tp for tp in self.expected if tp[1] not in owned]:
            del self.expected[tp]
            self.first.pop(tp, None)
            self._marks.pop(tp, None)


class RangeReader:
    """Reads ``[start, end)`` of one topic-partition with a group-less consumer of its own."""

    def __init__(self, bootstrap_servers: str, *, poll_ms: int = 500) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.poll_ms = poll_ms
        self._consumer: AIOKafkaConsumer | None = None

    async def read(self, topic: str, partition: int, start: int, end: int) -> list[Any]:
        """Return the records of ``topic`` / ``partition`` with ``start <= offset < end``.

        Waits (logging every few seconds) while the broker does not answer: a skipped record
        is never given up. Records already deleted by retention are gone; reading then starts
        at the partition's first offset.
        """
        consumer = await self._ready()
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, start)
        out: list[Any] = []
        waited = 0
        while await consumer.position(tp) < end:
            fetched = await consumer.getmany(tp, timeout_ms=self.poll_ms)
            records = fetched.get(tp, [])
            out.extend(r for r in records if start <= r.offset < end)
            if records and records[-1].offset >= end - 1:
                break
            waited = 0 if records else waited + self.poll_ms
            if waited and waited % 5000 == 0:
                logger.warning("still reading %s[%s] from %s to %s", topic, partition, start, end)
            await asyncio.sleep(0)
        return out

    async def _ready(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap_servers,
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
            )
            await consumer.start()
            self._consumer = consumer
        return self._consumer

    async def stop(self) -> None:
        """Close the consumer (idempotent)."""
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None


class CommittedReader:
    """Reads a consumer group's committed offsets from the broker (an admin client of its own)."""

    def __init__(self, bootstrap_servers: str) -> None:
        self.bootstrap_servers = bootstrap_servers
        self._admin: AIOKafkaAdminClient | None = None

    async def read(self, group_id: str) -> dict[tuple[str, int], int]:
        """Return ``{(topic, partition): offset}``; empty (and logged) when the broker fails."""
        try:
            if self._admin is None:
                admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap_servers)
                await admin.start()
                self._admin = admin
            offsets = await self._admin.list_consumer_group_offsets(group_id)
        except (KafkaError, OSError) as exc:
            logger.warning("committed offsets of %s not read: %r", group_id, exc)
            return {}
        return {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items()}

    async def stop(self) -> None:
        """Close the admin client (idempotent)."""
        if self._admin is not None:
            await self._admin.close()
            self._admin = None
