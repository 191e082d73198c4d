"""The learner's Kafka input: a kafka-python consumer in a child process.

The child polls the samples topic, cuts micro-batches by size or by time and decodes them
(:func:`learner.batching.decode_records`) while the parent trains on the previous batch. It is a
process, not a thread: kafka-python and the decoder are pure Python, and a thread running them
starves the training thread of the GIL (each of the hundreds of torch calls in a step waits for
the interpreter's switch interval): on 2 cores a thread pipeline trained *slower* than doing
both in turn. Batches travel back over a ``multiprocessing`` queue (pickled numpy columns; this
is process-to-process transport only, nothing stored is ever pickled).

Offsets: the consumer is *assigned* its partitions (no group rebalances) and seeks to the
offsets of the learner's checkpoint, which is the source of truth; the group (``learner``)
only receives a commit after each checkpoint, so that ``kafka-consumer-groups`` shows the lag.
Each batch carries the next offset of every partition it read, and the trainer advances its
own offsets only once it has trained the batch: a batch decoded but not trained when the
process stops is simply read again after the restart.

The child ignores SIGINT and SIGTERM (the parent stops it in order: stop, final commit, close)
and exits by itself within one poll when the parent dies, e.g. on SIGKILL.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event as EventType
from typing import Any, Final

from kafka import KafkaConsumer, OffsetAndMetadata, TopicPartition

from learner.batching import SampleColumns, decode_records
from learner.errors import LearnerError
from learner.features import FeatureSpec

__all__ = [
    "KafkaSource",
    "RecordBatch",
    "SourceConfig",
    "SourceError",
    "assign_partitions",
    "open_consumer",
]

logger = logging.getLogger(__name__)

_POLL_MS: Final = 100  # poll timeout: bounds how late a stop request or a partial batch is seen
_PUT_TIMEOUT_S: Final = 0.1
_CLOSE_WAIT_S: Final = 60.0  # how long a stopped child waits for its final commit
_START_TIMEOUT_S: Final = 120.0  # child start-up: imports, connection, waiting for the topic


class SourceError(LearnerError):
    """The samples topic cannot be read (missing topic, or the consumer process failed)."""


@dataclass
class RecordBatch:
    """A decoded micro-batch plus where it ends in each partition it read."""

    columns: SampleColumns  # valid samples (before dedupe) and bad-record counts
    n_records: int  # records consumed, bad ones included
    end_offsets: dict[int, int]  # partition -> offset after the batch's last record
    highwater: dict[int, int] = field(default_factory=dict)  # partition -> log end, if known


@dataclass(frozen=True)
class SourceConfig:
    """What the consumer process needs (plain values: it is sent to a spawned process)."""

    bootstrap: str
    group_id: str
    topic: str
    spec: FeatureSpec
    batch_size: int
    max_wait_s: float
    owned: tuple[int, ...] = ()  # partitions to assign; empty: all
    start: dict[int, int] = field(default_factory=dict)  # partition -> checkpoint offset
    start_from: str = "earliest"  # where partitions without a checkpoint offset start
    max_records: int = 0  # stop after this many records; 0: never
    log_level: int = logging.INFO


@dataclass
class _Assigned:
    """First message of the child: the partitions it reads."""

    partitions: list[int]


@dataclass
class _Finished:
    """Last message of the child: it reached max_records, or failed with `error`."""

    error: str | None = None


def open_consumer(bootstrap: str, group_id: str, batch_size: int) -> KafkaConsumer:
    """Create a consumer with manual offsets and fetch sizes fit for large micro-batches."""
    return KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group_id,
        client_id=f"mtlstream-{group_id}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=batch_size,
        # big fetches: the per-request overhead of kafka-python dominates small ones
        max_partition_fetch_bytes=8 << 20,
        fetch_max_bytes=64 << 20,
    )


def assign_partitions(
    consumer: KafkaConsumer,
    topic: str,
    owned: Sequence[int],
    start: Mapping[int, int],
    start_from: str,
    wait_s: float = 30.0,
) -> list[int]:
    """Assign the topic's partitions (all, or `owned`) and seek each to where it resumes.

    A partition with an offset in `start` (the checkpoint) resumes there; any other starts at
    the group's committed offset (``start_from="committed"``, earliest if none), the log start
    (``"earliest"``) or the log end (``"latest"``).
    """
    partitions = _wait_for_topic(consumer, topic, wait_s)
    if owned:
        missing = sorted(set(owned) - partitions)
        if missing:
            raise SourceError(f"topic {topic!r} has partitions {sorted(partitions)}, not {missing}")
        partitions = set(owned)
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    for tp in tps:
        _seek(consumer, tp, start.get(tp.partition), start_from)
    return [tp.partition for tp in tps]


def _wait_for_topic(consumer: KafkaConsumer, topic: str, wait_s: float) -> set[int]:
    deadline = time.monotonic() + wait_s
    while True:
        partitions = consumer.partitions_for_topic(topic)
        if partitions:
            return set(partitions)
        left = deadline - time.monotonic()
        if left <= 0:
            raise SourceError(f"topic {topic!r} does not exist (waited {wait_s:.0f} s)")
        logger.info("waiting for topic=%s, %.0f s left", topic, left)
        time.sleep(min(1.0, left))


def _seek(consumer: KafkaConsumer, tp: TopicPartition, offset: int | None, start_from: str) -> None:
    if offset is not None:
        consumer.seek(tp, offset)
        return
    if start_from == "committed":
        committed = consumer.committed(tp)
        if committed is not None:
            consumer.seek(tp, committed)
            return
    if start_from == "latest":
        consumer.seek_to_end(tp)
    else:
        consumer.seek_to_beginning(tp)


def commit_offsets(consumer: KafkaConsumer, topic: str, offsets: Mapping[int, int]) -> None:
    """Commit offsets to the consumer's group; failures are logged, never raised."""
    from kafka.errors import KafkaError

    payload = {TopicPartition(topic, p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items()}
    try:
        consumer.commit(payload)
    except KafkaError as exc:  # visibility only: the checkpoint holds the real offsets
        logger.warning("offset commit to the group failed: %s", exc)


class KafkaSource:
    """Parent side: starts the consumer process and hands out its `RecordBatch`es."""

    def __init__(self, config: SourceConfig, prefetch: int = 4) -> None:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
        self.config = config
        self.finished = False  # set once the child's end marker was taken
        self.partitions: list[int] = []
        self._batches: Any = ctx.Queue(maxsize=prefetch)
        self._commands: Any = ctx.Queue()
        self._stop = ctx.Event()
        self._first_poll_at = ctx.Value("d", 0.0)  # monotonic; 0 until the first poll
        self._last_data_at = ctx.Value("d", 0.0)  # monotonic time the last record arrived
        self._emitted = ctx.Value("q", 0)  # batches the child queued
        self._received = 0  # batches the parent took
        self._process = ctx.Process(
            target=_child_main,
            args=(
                config,
                os.getpid(),
                self._batches,
                self._commands,
                self._stop,
                (self._first_poll_at, self._last_data_at, self._emitted),
            ),
            name="learner-source",
            daemon=True,
        )

    def start(self) -> list[int]:
        """Start the consumer process; return its partitions once it has assigned them."""
        self._process.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                item = self._batches.get(timeout=0.5)
            except queue.Empty:
                if not self._process.is_alive():
                    raise SourceError("the consumer process died at start-up") from None
                continue
            if isinstance(item, _Assigned):
                self.partitions = item.partitions
                return item.partitions
            if isinstance(item, _Finished):
                raise SourceError(f"the consumer process failed: {item.error}")
        raise SourceError(f"the consumer process did not start within {_START_TIMEOUT_S:.0f} s")

    def get(self, timeout: float) -> RecordBatch | None:
        """Return the next batch, or None when none arrived within `timeout` seconds."""
        try:
            item = self._batches.get(timeout=timeout)
        except queue.Empty:
            if not self._process.is_alive() and not self.finished:
                raise SourceError("the consumer process died") from None
            return None
        if isinstance(item, _Finished):
            self.finished = True
            if item.error is not None:
                raise SourceError(f"the consumer process failed: {item.error}")
            return None
        self._received += 1
        return item if isinstance(item, RecordBatch) else None

    def idle_for(self) -> float:
        """Seconds since the last record arrived; 0 while records are on their way."""
        first = float(self._first_poll_at.value)
        if first == 0.0 or self._emitted.value != self._received:
            return 0.0
        return time.monotonic() - max(first, float(self._last_data_at.value))

    def request_commit(self, offsets: Mapping[int, int]) -> None:
        """Have the child commit these offsets to the consumer group."""
        self._commands.put(("commit", dict(offsets)))

    def stop(self) -> None:
        """Stop consuming (within one poll); untaken batches are dropped, never trained."""
        self._stop.set()

    def commit(self, offsets: Mapping[int, int]) -> None:
        """Final commit, after `stop()` (the child commits it before closing)."""
        self.request_commit(offsets)

    def close(self) -> None:
        """Let the child commit and close its consumer, then wait for it to exit."""
        self._stop.set()
        self._commands.put(("close", None))
        self._process.join(timeout=30)
        if self._process.is_alive():
            logger.warning("consumer process did not exit, terminating it")
            self._process.terminate()
            self._process.join(timeout=5)
        self._batches.cancel_join_thread()
        self._commands.cancel_join_thread()


# --- the child process --------------------------------------------------------------------------


def _child_main(
    config: SourceConfig,
    parent_pid: int,
    batches: Any,
    commands: Any,
    stop: EventType,
    shared: tuple[Any, Any, Any],
) -> None:
    """Entry point of the consumer process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("kafka").setLevel(logging.ERROR)
    batches.cancel_join_thread()  # exit even if the parent no longer reads
    child = _Child(config, parent_pid, batches, commands, stop, shared)
    try:
        child.run()
    except Exception as exc:  # reported to the parent, which raises SourceError
        logger.exception("consumer process failed")
        child.put(_Finished(repr(exc)))
    finally:
        child.close()


class _Child:
    """The consumer loop: poll, batch, decode, queue; commit when told; close at the end."""

    def __init__(
        self,
        config: SourceConfig,
        parent_pid: int,
        batches: Any,
        commands: Any,
        stop: EventType,
        shared: tuple[Any, Any, Any],
    ) -> None:
        self.config = config
        self.parent_pid = parent_pid
        self.batches = batches
        self.commands = commands
        self.stop = stop
        self.first_poll_at, self.last_data_at, self.emitted = shared
        self.consumer: KafkaConsumer | None = None

    def parent_alive(self) -> bool:
        return os.getppid() == self.parent_pid

    def running(self) -> bool:
        return not self.stop.is_set() and self.parent_alive()

    def run(self) -> None:
        c = self.config
        self.consumer = open_consumer(c.bootstrap, c.group_id, c.batch_size)
        partitions = assign_partitions(self.consumer, c.topic, c.owned, c.start, c.start_from)
        self.put(_Assigned(partitions))
        if self.loop():
            self.put(_Finished())
        self.wait_for_close()

    def loop(self) -> bool:
        """Consume until stopped; return True when max_records was reached."""
        consumer = self.consumer
        if consumer is None:
            raise RuntimeError("run() opens the consumer first")
        c = self.config
        values: list[bytes | None] = []
        ends: dict[int, int] = {}
        first_at = 0.0
        remaining = c.max_records or -1  # -1: unlimited
        while self.running() and remaining != 0:
            self.drain_commands()
            limit = c.batch_size - len(values)
            if remaining > 0:
                limit = min(limit, remaining)
            got = self.collect(consumer.poll(timeout_ms=_POLL_MS, max_records=limit), values, ends)
            now = time.monotonic()
            if self.first_poll_at.value == 0.0:
                self.first_poll_at.value = now
            if got:
                self.last_data_at.value = now
                first_at = first_at if len(values) > got else now
                remaining = remaining - got if remaining > 0 else remaining
            full = len(values) >= c.batch_size or remaining == 0
            if values and (full or now - first_at >= c.max_wait_s):
                self.emit(values, ends)
                values, ends = [], {}
        return remaining == 0

    @staticmethod
    def collect(
        polled: Mapping[TopicPartition, list[Any]], values: list[bytes | None], ends: dict[int, int]
    ) -> int:
        got = 0
        for tp, records in polled.items():
            if records:
                values.extend(r.value for r in records)
                ends[tp.partition] = records[-1].offset + 1
                got += len(records)
        return got

    def emit(self, values: list[bytes | None], ends: dict[int, int]) -> None:
        consumer = self.consumer
        columns = decode_records(values, self.config.spec)
        highwater: dict[int, int] = {}
        for p in ends:
            hw = (
                None
                if consumer is None
                else consumer.highwater(TopicPartition(self.config.topic, p))
            )
            if hw is not None:
                highwater[p] = int(hw)
        if self.put(RecordBatch(columns, len(values), dict(ends), highwater)):
            with self.emitted.get_lock():
                self.emitted.value += 1

    def put(self, item: Any) -> bool:
        """Queue an item, waiting while the parent is busy; False if stopped meanwhile."""
        while True:
            try:
                self.batches.put(item, timeout=_PUT_TIMEOUT_S)
                return True
            except queue.Full:
                if not self.running():
                    return False

    def drain_commands(self, timeout: float = 0.0) -> bool:
        """Apply queued commands (commits); return True once "close" was received."""
        while True:
            try:
                if timeout > 0:
                    kind, offsets = self.commands.get(timeout=timeout)
                else:
                    kind, offsets = self.commands.get_nowait()
            except queue.Empty:
                return False
            if kind == "close":
                return True
            if self.consumer is not None and offsets:
                commit_offsets(self.consumer, self.config.topic, offsets)

    def wait_for_close(self) -> None:
        """After the loop: apply the final commit, until the parent says close (or dies)."""
        deadline = time.monotonic() + _CLOSE_WAIT_S
        while self.parent_alive() and time.monotonic() < deadline:
            if self.drain_commands(timeout=0.2):
                return

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close()
