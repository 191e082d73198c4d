"""The join worker's direct engine (``MTL_STREAM_ENGINE=direct``): a batch consumer, no agent.

faust delivers records to an agent one event at a time, through a consumer thread, a conductor,
a stream buffer and one acknowledgement per event; on the 2-core machine a faust agent that only
counts its events tops out near 12k events/s (``benchmarks/stream_e2e.py``). This engine drives
the same :class:`stream.worker.JoinWorker`, output and join state with an aiokafka consumer that
fetches records in batches:

- one consumer group (``MTL_STREAM_APP_ID``) over the three co-partitioned input topics, with
  the range assignor so that partition *p* of every input goes to the same worker;
- the join state of each owned partition is a dict, rebuilt on assignment by reading the
  partition of the changelog topic faust uses (``{app_id}-join_state-changelog``, compacted);
- per batch: handle the records, flush the output (:class:`stream.output.BatchOutput`, which
  waits for the broker's acknowledgement), write the states held back for those samples and
  the partitions' event times, flush again, then commit the batch's offsets, so everything
  derived from a committed offset is durable (at-least-once, deterministic sample ids);
- idle partitions are ticked from the loop itself (no tick topic), and an input partition with
  records still to read (behind its high watermark) never counts as idle; counters, metrics,
  the status line and the health key are those of the faust engine.

The two engines share the changelog format and the output, but not a consumer group protocol:
run one engine per app id.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Iterable
from typing import Any

import redis.asyncio
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import CommitFailedError, IllegalStateError

from feature_store.counters import AsyncItemCounterWriter, CounterEvent, counter_client
from feature_store.keys import KeySpace
from stream.output import BatchOutput, ChangelogTable, OutputSettings, OutputSink
from stream.settings import StreamSettings
from stream.worker import JoinWorker

__all__ = ["DirectJoin", "run"]

logger = logging.getLogger(__name__)

_RECOVERY_POLL_MS = 500


def _now_ms() -> int:
    return int(time.time() * 1000)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    """Hands partition changes to the engine (aiokafka awaits these inside a poll)."""

    def __init__(self, engine: DirectJoin) -> None:
        self.engine = engine

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.engine.revoke({tp.partition for tp in revoked})

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self.engine.assign({tp.partition for tp in assigned})


class DirectJoin:
    """Consume, join, flush, commit: one batch at a time, until :meth:`stop`."""

    def __init__(self, settings: StreamSettings) -> None:
        self.settings = settings
        self.worker = JoinWorker(
            settings.join_config(),
            settings.decode_limits(),
            settings.input_topics,
            idle_timeout_ms=settings.idle_timeout_ms,
        )
        self.output = BatchOutput(OutputSettings(settings.kafka_bootstrap))
        self.sink = OutputSink(
            self.output,
            samples_topic=settings.samples_topic,
            dead_letters_topic=settings.dead_letters_topic,
            input_partitions=settings.partitions,
            counters=settings.counters_enabled,
        )
        self.data: dict[int, dict[bytes, bytes]] = {}  # owned partition -> its join state
        self.table = ChangelogTable({}, settings.changelog_topic, self.output)
        self.consumer = AIOKafkaConsumer(
            *settings.input_topics,
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=settings.app_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            partition_assignment_strategy=(RangePartitionAssignor,),
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        self.pending: dict[TopicPartition, int] = {}  # handled, not yet committed: next offsets
        self.busy: set[int] = set()  # partitions with an input behind its high watermark
        self.next_offsets: dict[TopicPartition, int] = {}  # next offset to handle, per input
        self.stopping = asyncio.Event()
        self.counter_events: list[CounterEvent] = []
        self.redis = redis.asyncio.Redis.from_url(settings.redis_url, socket_timeout=2.0)
        self.counters_client = counter_client(settings.redis_url, timeout_s=2.0)
        self.health_key = KeySpace(settings.namespace).health(settings.health_process)

    # -- lifecycle ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish its batch, flush, commit and return."""
        self.stopping.set()

    async def run(self) -> None:
        """Run until :meth:`stop`; flush and commit what was handled before returning."""
        await self.output.start()
        await self.sink.size(list(self.settings.input_topics))
        self.consumer.subscribe(list(self.settings.input_topics), listener=_Rebalance(self))
        await self.consumer.start()
        tasks = [
            asyncio.create_task(self._every(self.settings.log_every_s, self.log_status)),
            asyncio.create_task(self._every(self.settings.counter_within_s, self.write_counters)),
        ]
        next_tick = time.monotonic()
        try:
            while not self.stopping.is_set():
                batches = await self.consumer.getmany(
                    timeout_ms=int(self.settings.batch_within_s * 1000),
                    max_records=self.settings.batch_size,
                )
                # Mark backlogged inputs as read *before* handling, and tick in this loop
                # rather than on a timer: a stall elsewhere in the process (a large counter
                # write) must not make an input with records waiting look idle.
                await self.hold_backlogged()
                self.handle(batches)
                if time.monotonic() >= next_tick:
                    self.tick()
                    next_tick = time.monotonic() + self.settings.tick_interval_s
                await self.commit()
        finally:
            for task in tasks:
                task.cancel()
            await self.commit()
            await self.write_counters()
            await self.consumer.stop()
            await self.output.stop()
            await self.redis.aclose()
            await self.counters_client.aclose()
            logger.info("stream %s", self.worker.metrics.status_line())

    async def _every(self, period_s: float, action: Any) -> None:
        while True:
            await asyncio.sleep(period_s)
            await action()

    # -- records ------------------------------------------------------------------------------

    def handle(self, batches: dict[TopicPartition, list[Any]]) -> None:
        """Apply a fetched batch to the join (synchronous: no await between records)."""
        now_ms = _now_ms()
        for tp, records in batches.items():
            if not records:
                continue
            if tp.partition not in self.data:
                # Not ready: still recovering its state (aiokafka fetches while the listener
                # runs), or revoked while the batch was in flight. Read these records again
                # later; a revoked partition's new owner reads them from the committed offset.
                if tp in self.consumer.assignment():
                    self.consumer.seek(tp, records[0].offset)
                continue
            self._select(tp.partition)
            for r in records:
                self.worker.on_record(
                    tp.topic,
                    tp.partition,
                    r.offset,
                    r.key,
                    r.value,
                    table=self.table,
                    sink=self.sink,
                    now_ms=now_ms,
                )
            self.pending[tp] = self.next_offsets[tp] = records[-1].offset + 1
        self._take_counters()

    async def hold_backlogged(self) -> None:
        """Keep an input with records still to read from counting as idle.

        An input partition stops holding its partition's watermark back only when it has had
        nothing to read for ``MTL_IDLE_TIMEOUT_MS``. A batch consumer may drain one fetched
        partition for a while before returning another's records, so "not returned lately"
        is not "nothing to read": a partition behind its high watermark is marked as read.
        """
        now_ms = _now_ms()
        kinds = self.settings.input_topics
        self.busy = set()
        for tp in self.consumer.assignment():
            if tp.partition not in self.data:
                continue
            highwater = self.consumer.highwater(tp)
            # the next offset *handled*, not the fetcher's position (which runs ahead of what
            # getmany returned); before the first record, where consumption starts
            position = self.next_offsets.get(tp)
            if position is None:
                position = await self.consumer.position(tp)
            if highwater is None or position < highwater:
                self.worker.tracker.observe(kinds[tp.topic], tp.partition, None, now_ms)
                self.busy.add(tp.partition)

    def tick(self) -> None:
        """Advance the owned partitions with nothing left to read (their records cannot)."""
        now_ms = _now_ms()
        for partition in list(self.data):
            if partition in self.busy:
                continue  # records are on their way: they advance it
            self._select(partition)
            self.worker.on_tick(partition, table=self.table, sink=self.sink, now_ms=now_ms)
        self._take_counters()

    def _select(self, partition: int) -> None:
        self.table.data = self.data[partition]
        self.table.partition = self.sink.partition = partition

    async def commit(self) -> None:
        """Flush the output, then commit the offsets of the records it came from.

        A commit refused because the group is rebalancing is dropped: the partitions' next
        owner handles those records again, which at-least-once allows (same sample ids).
        """
        offsets, self.pending = self.pending, {}
        await self.output.flush()
        held = [p for p in self.worker.unconfirmed_partitions() if p in self.data]
        for partition in held:  # their samples are acknowledged now: write states, event times
            self._select(partition)
            self.worker.confirm(partition, self.table)
        if held:
            await self.output.flush()
        if offsets:
            try:
                await self.consumer.commit(offsets)
            except (CommitFailedError, IllegalStateError) as exc:
                logger.warning("commit of %s partitions refused: %r", len(offsets), exc)

    # -- partitions ---------------------------------------------------------------------------

    async def revoke(self, partitions: set[int]) -> None:
        """Before a rebalance: make what was handled durable and committed, then forget it."""
        await self.commit()
        self.worker.revoke(partitions)
        for partition in partitions:
            self.data.pop(partition, None)
        self.next_offsets = {
            tp: o for tp, o in self.next_offsets.items() if tp.partition not in partitions
        }
        logger.info("partitions revoked: %s", sorted(partitions))

    async def assign(self, partitions: set[int]) -> None:
        """After a rebalance: rebuild the join state of newly owned partitions."""
        new = sorted(p for p in partitions if p not in self.data)
        if new:
            recovered = await self.recover(new)
            self.data.update(recovered)
            for partition in new:
                self._select(partition)
                self.worker.on_tick(partition, table=self.table, sink=self.sink, now_ms=_now_ms())
            logger.info(
                "partitions assigned: %s (recovered keys %s)",
                new,
                {p: len(recovered[p]) for p in new},
            )

    async def recover(self, partitions: list[int]) -> dict[int, dict[bytes, bytes]]:
        """Read the changelog partitions from the beginning to their end: the last value wins."""
        topic = self.settings.changelog_topic
        states: dict[int, dict[bytes, bytes]] = {p: {} for p in partitions}
        reader = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            enable_auto_commit=False,
            group_id=None,
        )
        await reader.start()
        try:
            tps = [TopicPartition(topic, p) for p in partitions]
            reader.assign(tps)
            await reader.seek_to_beginning(*tps)
            ends = await reader.end_offsets(tps)
            todo = {tp for tp in tps if ends[tp] > 0}
            while todo:
                fetched = await reader.getmany(*todo, timeout_ms=_RECOVERY_POLL_MS)
                for tp, records in fetched.items():
                    state = states[tp.partition]
                    for r in records:
                        if r.value is None:
                            state.pop(r.key, None)
                        else:
                            state[r.key] = r.value
                for tp in list(todo):
                    if await reader.position(tp) >= ends[tp]:
                        todo.discard(tp)
        finally:
            await reader.stop()
        return states

    # -- counters, status ---------------------------------------------------------------------

    def _take_counters(self) -> None:
        if self.sink.counters:
            self.counter_events.extend(self.sink.counters)
            self.sink.counters = []

    async def write_counters(self) -> None:
        """Write the collected live item counters to Redis (best effort, never blocks the join)."""
        events, self.counter_events = self.counter_events, []
        if not events:
            return
        writer = AsyncItemCounterWriter(self.counters_client, namespace=self.settings.namespace)
        try:
            await writer.write(events)
        except redis.RedisError as exc:
            logger.warning("counter batch of %s dropped: %r", len(events), exc)

    async def log_status(self) -> None:
        """The status line, also written under the health key with a TTL (``--check``)."""
        open_keys = self.worker.open_keys()
        self.worker.metrics.open_keys(open_keys)
        line = f"{self.worker.metrics.status_line()} open_keys={open_keys}"
        logger.info("stream %s", line)
        try:
            await self.redis.set(self.health_key, line, ex=self.settings.health_ttl_s)
        except redis.RedisError as exc:
            logger.warning("health key not written: %r", exc)


def run(settings: StreamSettings) -> int:
    """Run the direct engine until SIGTERM / SIGINT; return the exit code (0)."""

    async def main() -> None:
        engine = DirectJoin(settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, engine.stop)
        if settings.metrics_port:
            from prometheus_client import start_http_server

            start_http_server(settings.metrics_port)
        logger.info("Worker ready (direct engine)")
        await engine.run()

    asyncio.run(main())
    return 0
