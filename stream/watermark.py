"""Event-time watermarks per partition, and a deadline index of keys waiting for one.

The watermark of partition p is the smallest, over the input topics, of the largest
event time read from that topic's partition p, minus the allowed lateness: a topic read
ahead of the others (a backlog replay) must not finish samples early. A topic-partition
with nothing read for longer than an idle timeout (wall clock) stops holding it back.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from stream.events import CLICKS, FOLLOW_CLICKS, IMPRESSIONS

__all__ = ["NO_WATERMARK", "DeadlineIndex", "WatermarkTracker"]

NO_WATERMARK: Final = -(2**63)  # before any event time: nothing is due


@dataclass(slots=True)
class _Input:
    """One topic-partition as the tracker sees it."""

    max_ts: int | None = None  # largest event time read, None before any
    last_read: int = 0  # wall clock (ms) of the last record read


@dataclass(slots=True)
class _Partition:
    inputs: dict[str, _Input] = field(default_factory=dict)
    watermark: int = NO_WATERMARK  # last value handed out: never goes back


class WatermarkTracker:
    """Per-partition watermarks over several input topics.

    Parameters
    ----------
    allowed_lateness_ms
        Subtracted from the event times: how far out of order events may arrive.
    idle_timeout_ms
        Wall-clock time after which a topic-partition with nothing read stops holding
        the watermark back.
    topics
        The input topics whose partitions are co-partitioned.

    Examples
    --------
    >>> wm = WatermarkTracker(allowed_lateness_ms=1_000, idle_timeout_ms=30_000)
    >>> wm.observe("impressions", 0, ts=10_000, now_ms=0)
    >>> wm.observe("clicks", 0, ts=50_000, now_ms=0)
    >>> wm.watermark(0, now_ms=0)  # follow_clicks has nothing yet: it holds everything
    -9223372036854775808
    >>> wm.observe("follow_clicks", 0, ts=60_000, now_ms=0)
    >>> wm.watermark(0, now_ms=0)  # the slowest topic decides
    9000
    >>> wm.watermark(0, now_ms=40_000)  # all idle: everything read is all there is
    59000
    """

    def __init__(
        self,
        *,
        allowed_lateness_ms: int = 60_000,
        idle_timeout_ms: int = 30_000,
        topics: Iterable[str] = (IMPRESSIONS, CLICKS, FOLLOW_CLICKS),
    ) -> None:
        if allowed_lateness_ms < 0:
            raise ValueError(f"allowed_lateness_ms must be >= 0, got {allowed_lateness_ms}")
        if idle_timeout_ms <= 0:
            raise ValueError(f"idle_timeout_ms must be > 0, got {idle_timeout_ms}")
        self.topics: tuple[str, ...] = tuple(topics)
        if not self.topics:
            raise ValueError("WatermarkTracker needs at least one topic")
        self.allowed_lateness_ms = allowed_lateness_ms
        self.idle_timeout_ms = idle_timeout_ms
        self._partitions: dict[int, _Partition] = {}

    def assign(self, partition: int, now_ms: int) -> None:
        """Start tracking a partition; its idle clocks start now (idempotent)."""
        if partition not in self._partitions:
            inputs = {topic: _Input(last_read=now_ms) for topic in self.topics}
            self._partitions[partition] = _Partition(inputs=inputs)

    def revoke(self, partition: int) -> None:
        """Forget a partition (after a rebalance took it away)."""
        self._partitions.pop(partition, None)

    def event_times(self, partition: int) -> dict[str, int]:
        """The largest event time read from each input of ``partition`` (inputs with none left
        out): what a new owner of the partition needs to go on from (:meth:`restore`)."""
        part = self._partitions.get(partition)
        if part is None:
            return {}
        return {t: s.max_ts for t, s in part.inputs.items() if s.max_ts is not None}

    def restore(self, partition: int, event_times: dict[str, int], now_ms: int) -> None:
        """Start from a previous owner's :meth:`event_times` (unknown topics are ignored).

        Without them, a partition whose records were all read and committed by its previous
        owner would have no event time at all, and the keys it recovered would never be due.
        """
        self.assign(partition, now_ms)
        for topic, ts in event_times.items():
            slot = self._partitions[partition].inputs.get(topic)
            if slot is not None and (slot.max_ts is None or ts > slot.max_ts):
                slot.max_ts = ts

    def observe(self, topic: str, partition: int, ts: int | None, now_ms: int) -> None:
        """Record that a record was read; ``ts`` is its event time, None if it had none."""
        part = self._partitions.get(partition)
        if part is None:
            self.assign(partition, now_ms)
            part = self._partitions[partition]
        slot = part.inputs.get(topic)
        if slot is None:
            raise ValueError(f"unknown topic {topic!r}; tracking {list(self.topics)}")
        slot.last_read = now_ms
        if ts is not None and (slot.max_ts is None or ts > slot.max_ts):
            slot.max_ts = ts

    def watermark(self, partition: int, now_ms: int) -> int:
        """Return the partition's watermark (NO_WATERMARK before it can say anything)."""
        part = self._partitions.get(partition)
        if part is None:
            return NO_WATERMARK
        active: int | None = None
        latest: int | None = None
        held = False
        for slot in part.inputs.values():
            idle = now_ms - slot.last_read > self.idle_timeout_ms
            if slot.max_ts is not None and (latest is None or slot.max_ts > latest):
                latest = slot.max_ts
            if idle:
                continue
            if slot.max_ts is None:
                held = True  # an active input with nothing read yet: no event time at all
            elif active is None or slot.max_ts < active:
                active = slot.max_ts
        if held:
            candidate = NO_WATERMARK
        elif active is not None:
            candidate = active - self.allowed_lateness_ms
        elif latest is not None:
            # Every input is idle: everything read so far is all there is.
            candidate = latest - self.allowed_lateness_ms
        else:
            candidate = NO_WATERMARK
        if candidate > part.watermark:
            part.watermark = candidate
        return part.watermark

    def partitions(self) -> list[int]:
        """Return the tracked partitions."""
        return sorted(self._partitions)


class DeadlineIndex:
    """Keys ordered by the watermark at which they are next due (a heap, lazy deletion).

    Setting a key again replaces its deadline; stale heap entries are skipped on pop
    and compacted away when they outnumber the live ones.

    Examples
    --------
    >>> due = DeadlineIndex()
    >>> due.set("a", 30); due.set("b", 10); due.set("a", 5)
    >>> due.pop_due(10), len(due)
    (['a', 'b'], 0)
    """

    __slots__ = ("_deadlines", "_heap")

    def __init__(self) -> None:
        self._heap: list[tuple[int, str]] = []
        self._deadlines: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._deadlines)

    def __contains__(self, key: object) -> bool:
        return key in self._deadlines

    def get(self, key: str) -> int | None:
        """Return the key's deadline, None if it has none."""
        return self._deadlines.get(key)

    def set(self, key: str, deadline: int | None) -> None:
        """Set (or with None, remove) the key's deadline."""
        if deadline is None:
            self._deadlines.pop(key, None)
            return
        if self._deadlines.get(key) == deadline:
            return
        self._deadlines[key] = deadline
        heapq.heappush(self._heap, (deadline, key))
        if len(self._heap) > 2 * len(self._deadlines) + 64:
            self._compact()

    def discard(self, key: str) -> None:
        """Remove the key's deadline if it has one."""
        self._deadlines.pop(key, None)

    def next_deadline(self) -> int | None:
        """Return the earliest deadline, None if the index is empty."""
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, watermark: int) -> list[str]:
        """Remove and return the keys whose deadline is <= watermark, earliest first."""
        due: list[str] = []
        heap = self._heap
        deadlines = self._deadlines
        while heap and heap[0][0] <= watermark:
            deadline, key = heapq.heappop(heap)
            if deadlines.get(key) == deadline:
                del deadlines[key]
                due.append(key)
        return due

    def _drop_stale(self) -> None:
        heap = self._heap
        while heap and self._deadlines.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)

    def _compact(self) -> None:
        self._heap = [(d, k) for k, d in self._deadlines.items()]
        heapq.heapify(self._heap)
