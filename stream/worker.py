"""The join worker's record handling, independent of the engine: decode, watermark, join, emit.

:class:`JoinWorker` is driven one record at a time by an engine (the faust agent in
``stream/app.py`` or the batch consumer in ``stream/direct.py``) and talks to the outside
through a :class:`Sink` and a table (any ``MutableMapping[bytes, bytes]``; in production a
:class:`stream.output.ChangelogTable` whose changelog makes it durable). Tests drive it with a dict.

Durability: a key's state that records an emitted sample is written to the table only once the
sample is acknowledged by Kafka (until then it is *deferred* and served from memory). After a
crash the table therefore never claims a sample that Kafka lost: the older state is recovered,
its deadline is already due, and the sample is emitted again with the same ``sample_id``.
The engines flush the output, then :meth:`JoinWorker.confirm` the held states and flush again,
and only then let the input offsets be committed, so a committed offset never stands for a
state the changelog lacks.

The same confirm step writes each partition's event times (the largest ``ts`` read from each
input) under a reserved key, :func:`event_times_key`. A partition's next owner restores them: if
the previous owner read and committed every record, nothing is left to read that could give the
new owner an event time, and without them the keys it recovered would never be due.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from stream.errors import BadEventError, BadStateError
from stream.events import (
    DecodeLimits,
    Event,
    Impression,
    dead_letter,
    dead_letter_for,
    decode_event,
    encode_sample,
)
from stream.join import FINAL, JoinConfig, JoinResult, JoinState, deadline, step
from stream.metrics import StreamMetrics
from stream.watermark import NO_WATERMARK, DeadlineIndex, WatermarkTracker

__all__ = ["Delivery", "JoinWorker", "Sink", "event_times_key"]

logger = logging.getLogger(__name__)

Table = MutableMapping[bytes, bytes]

# Table keys are impression ids; a key starting with NUL is the worker's own (such ids are
# refused as input).
_RESERVED = b"\x00"
_EVENT_TIMES = _RESERVED + b"event_times:"
_DROPPED = b""  # stands for "some stored state" where a state is dropped without reading it


def event_times_key(partition: int) -> bytes:
    """The table key under which ``partition``'s event times are kept."""
    return _EVENT_TIMES + str(partition).encode()


class Delivery(Protocol):
    """A pending Kafka send (faust's FutureMessage is one)."""

    def done(self) -> bool: ...


class Sink(Protocol):
    """Where the worker's output goes; every method returns at once (buffered sends)."""

    def sample(self, key: bytes, value: bytes) -> Delivery: ...

    def dead_letter(self, value: bytes) -> None: ...

    def forward(self, topic: str, key: bytes, value: bytes) -> None: ...

    def counter(self, item_id: str, kind: str, ts: int) -> None: ...


@dataclass(slots=True)
class _Deferred:
    """A key's newest state, held back from the table until its samples are acknowledged."""

    value: bytes | None  # encoded state to write; None: delete the key
    pending: list[Delivery] = field(default_factory=list)


class JoinWorker:
    """Applies records of co-partitioned input topics to the join state of their partition.

    Parameters
    ----------
    config
        Join windows and mode.
    limits
        What the input decoder accepts.
    topics
        Actual input topic name -> record kind (``impressions``, ``clicks``, ``follow_clicks``).
    idle_timeout_ms
        Wall-clock time after which an input partition with nothing to read stops holding the
        watermark back.
    """

    def __init__(
        self,
        config: JoinConfig,
        limits: DecodeLimits,
        topics: dict[str, str],
        idle_timeout_ms: int,
        metrics: StreamMetrics | None = None,
    ) -> None:
        self.config = config
        self.limits = limits
        self.topics = topics
        self.metrics = metrics or StreamMetrics()
        self.tracker = WatermarkTracker(
            allowed_lateness_ms=config.allowed_lateness_ms,
            idle_timeout_ms=idle_timeout_ms,
            topics=sorted(set(topics.values())),
        )
        self._indexes: dict[int, DeadlineIndex] = {}
        self._deferred: dict[int, dict[bytes, _Deferred]] = {}
        # keys in the order their samples were sent: acknowledgements arrive roughly in order
        self._deferred_order: dict[int, deque[bytes]] = {}
        self._saved_times: dict[int, dict[str, int]] = {}  # event times last written, per partition
        # keys whose state is final (a tombstone kept for late events): due only to be dropped
        self._final: dict[int, set[str]] = {}

    # -- entry points -------------------------------------------------------------------------

    def on_record(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        *,
        table: Table,
        sink: Sink,
        now_ms: int,
    ) -> None:
        """Handle one input record read from ``topic`` / ``partition`` at ``offset``."""
        kind = self.topics[topic]
        self._ensure_partition(partition, table, now_ms)
        self.metrics.event(kind)
        try:
            event = decode_event(kind, value, limits=self.limits, now_ms=now_ms)
        except BadEventError as exc:
            self.tracker.observe(kind, partition, None, now_ms)
            self._dead_letter(sink, dead_letter(topic, partition, offset, value, exc.reason))
            return
        imp_key = event.impression_id.encode()
        if imp_key.startswith(_RESERVED):
            self.tracker.observe(kind, partition, None, now_ms)
            reason = "bad_value:impression_id"
            self._dead_letter(sink, dead_letter(topic, partition, offset, value, reason))
            return
        if key != imp_key:
            # Keyed otherwise (or not at all): send it to the partition that owns its impression.
            self.tracker.observe(kind, partition, None, now_ms)
            self.metrics.repartition()
            sink.forward(topic, imp_key, value or b"")
            return
        self.tracker.observe(kind, partition, event.ts, now_ms)
        watermark = self.tracker.watermark(partition, now_ms)
        self._apply(partition, imp_key, event, watermark, table, sink, now_ms)
        self._expire(partition, watermark, table, sink, now_ms)

    def on_tick(self, partition: int, *, table: Table, sink: Sink, now_ms: int) -> None:
        """Advance an (idle) partition: emit what is due."""
        self._ensure_partition(partition, table, now_ms)
        watermark = self.tracker.watermark(partition, now_ms)
        self._expire(partition, watermark, table, sink, now_ms)

    def confirm(self, partition: int, table: Table) -> None:
        """Write the partition's held-back states whose samples are acknowledged, and its
        event times if they moved.

        Call it after the output is flushed and before the input offsets are committed: a
        committed offset then never stands for a state change the changelog lacks (otherwise a
        restart would rebuild the key from an older state and lose the committed events).
        """
        if partition in self._deferred:
            self._confirm(partition, table)
            times = self.tracker.event_times(partition)
            if times and times != self._saved_times.get(partition):
                record = {"pt": partition, "event_times": times}
                table[event_times_key(partition)] = orjson.dumps(record)
                self._saved_times[partition] = times

    def unconfirmed_partitions(self) -> list[int]:
        """Partitions with something to :meth:`confirm`: states held back until their samples
        are acknowledged, or event times not written yet."""
        return [
            p
            for p, held in self._deferred.items()
            if held or self.tracker.event_times(p) != self._saved_times.get(p, {})
        ]

    def revoke(self, partitions: set[int]) -> None:
        """Forget partitions that a rebalance took away (their new owner rebuilds them)."""
        for p in partitions:
            self._indexes.pop(p, None)
            self._deferred.pop(p, None)
            self._deferred_order.pop(p, None)
            self._saved_times.pop(p, None)
            self._final.pop(p, None)
            self.tracker.revoke(p)

    def open_keys(self) -> int:
        """Keys waiting for a deadline, over all partitions."""
        return sum(len(idx) for idx in self._indexes.values())

    # -- internals ----------------------------------------------------------------------------

    def _ensure_partition(self, partition: int, table: Table, now_ms: int) -> None:
        """On the first record of a newly assigned partition, index its recovered keys."""
        if partition in self._indexes:
            return
        index = DeadlineIndex()
        self._indexes[partition] = index
        self._deferred[partition] = {}
        self._deferred_order[partition] = deque()
        final = self._final[partition] = set()
        self.tracker.assign(partition, now_ms)
        recovered = 0
        for key, raw in list(table.items()):
            if key.startswith(_RESERVED):
                if key == event_times_key(partition):
                    self._restore_event_times(partition, raw, now_ms)
                continue
            state, owner = self._decode_state(key, raw)
            if owner == partition and state is not None:
                name = key.decode()
                index.set(name, deadline(state, self.config))
                if state.phase == FINAL:
                    final.add(name)
                recovered += 1
        if recovered:
            logger.info("partition=%s recovered_keys=%s", partition, recovered)

    def _restore_event_times(self, partition: int, raw: bytes | None, now_ms: int) -> None:
        try:
            times = orjson.loads(raw or b"null")["event_times"]
            times = {str(t): int(ts) for t, ts in times.items()}
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            logger.warning("unreadable event times for partition %s: not restored", partition)
            return
        self.tracker.restore(partition, times, now_ms)
        self._saved_times[partition] = self.tracker.event_times(partition)
        logger.info("partition=%s restored event_times=%s", partition, times)

    def _decode_state(self, key: bytes, raw: bytes | None) -> tuple[JoinState | None, int]:
        if raw is None:
            return None, -1
        try:
            obj = orjson.loads(raw)
            return JoinState.from_dict(obj), int(obj.get("pt", -1))
        except (orjson.JSONDecodeError, BadStateError, AttributeError, TypeError, ValueError):
            logger.warning("unreadable join state for key %r: dropped", key[:80])
            return None, -1

    def _load(
        self, partition: int, key: bytes, table: Table
    ) -> tuple[JoinState | None, bytes | None]:
        deferred = self._deferred[partition].get(key)
        raw = deferred.value if deferred is not None else table.get(key)
        return self._decode_state(key, raw)[0], raw

    def _apply(
        self,
        partition: int,
        key: bytes,
        event: Event | None,
        watermark: int,
        table: Table,
        sink: Sink,
        now_ms: int,
    ) -> None:
        before, raw = self._load(partition, key, table)
        result = step(before, event, watermark, self.config, now_ms=now_ms)
        self._count(before, event, result, sink, partition)
        after = result.state
        value = None
        if after is not None:
            encoded = after.to_dict()
            encoded["pt"] = partition
            value = orjson.dumps(encoded)
        deliveries = [self._emit(sink, key, s) for s in result.samples]
        self._store(partition, key, raw, value, deliveries, table)
        name = key.decode()
        self._indexes[partition].set(name, deadline(after, self.config))
        if after is not None and after.phase == FINAL:
            self._final[partition].add(name)
        else:
            self._final[partition].discard(name)

    def _emit(self, sink: Sink, key: bytes, sample: Any) -> Delivery:
        self.metrics.sample(sample.kind)
        return sink.sample(key, encode_sample(sample))

    def _store(
        self,
        partition: int,
        key: bytes,
        old: bytes | None,
        new: bytes | None,
        deliveries: list[Delivery],
        table: Table,
    ) -> None:
        deferred = self._deferred[partition]
        held = deferred.get(key)
        if deliveries or held is not None:
            if held is None:
                held = deferred[key] = _Deferred(new)
                self._deferred_order[partition].append(key)
            held.value = new
            held.pending.extend(deliveries)
        elif new != old:
            if new is None:
                table.pop(key, None)
            else:
                table[key] = new

    def _confirm(self, partition: int, table: Table) -> None:
        """Write deferred states whose samples Kafka has acknowledged (oldest first)."""
        deferred, order = self._deferred[partition], self._deferred_order[partition]
        while order:
            held = deferred[order[0]]
            if not all(p.done() for p in held.pending):
                return  # later sends are acknowledged after this one: check again next time
            key = order.popleft()
            del deferred[key]
            if held.value is None:
                table.pop(key, None)
            else:
                table[key] = held.value

    def _expire(
        self, partition: int, watermark: int, table: Table, sink: Sink, now_ms: int
    ) -> None:
        if watermark == NO_WATERMARK:
            return
        self.metrics.watermark(partition, now_ms - watermark)
        final = self._final[partition]
        for key in self._indexes[partition].pop_due(watermark):
            if key in final:
                # A final state is next due when its lateness is over, and only to be dropped
                # (step returns None for it, emitting nothing): skip decoding it.
                final.discard(key)
                self._store(partition, key.encode(), _DROPPED, None, [], table)
            else:
                self._apply(partition, key.encode(), None, watermark, table, sink, now_ms)

    def _count(
        self,
        before: JoinState | None,
        event: Event | None,
        result: JoinResult,
        sink: Sink,
        partition: int,
    ) -> None:
        for name, n in result.counters.items():
            self.metrics.anomaly(name, n)
        for orphan in result.orphans:
            self._dead_letter(sink, dead_letter_for(orphan.event, partition, orphan.reason))
        after = result.state
        if after is None or after.item_id is None:
            return
        if isinstance(event, Impression) and (before is None or before.imp_ts is None):
            sink.counter(after.item_id, "impression", event.ts)
        if after.click_ts is not None and (before is None or before.click_ts is None):
            sink.counter(after.item_id, "click", after.click_ts)

    def _dead_letter(self, sink: Sink, letter: Any) -> None:
        self.metrics.dead_letter(letter.reason)
        sink.dead_letter(orjson.dumps(letter.to_dict()))
