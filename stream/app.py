"""The faust application of the join worker: `mtlstream stream` or `faust -A stream.app worker`.

One agent reads the three co-partitioned input topics plus an internal tick topic, so one worker
owns every event of an impression; :class:`stream.worker.JoinWorker` makes the decisions and the
join state lives in a Table whose changelog survives restarts. Settings come from the
environment (:class:`stream.settings.StreamSettings`) when this module is imported.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import faust
import redis.asyncio
from faust.types import TP, Message

from feature_store.counters import AsyncItemCounterWriter, CounterEvent, counter_client
from feature_store.keys import KeySpace
from mtlstream.settings import from_env
from stream.gaps import CommittedReader, OffsetGuard, RangeReader
from stream.output import BatchOutput, ChangelogTable, OutputSettings, OutputSink
from stream.settings import StreamSettings
from stream.worker import JoinWorker

__all__ = ["app", "settings", "worker"]

logger = logging.getLogger(__name__)

settings = from_env(StreamSettings)

app = faust.App(
    settings.app_id,
    broker=f"kafka://{settings.kafka_bootstrap}",
    # In-memory table: the changelog topic is the durable copy, replayed on start.
    store="memory://",
    topic_partitions=settings.partitions,
    table_standby_replicas=0,
    web_enabled=False,
    datadir=settings.data_dir,
    autodiscover=False,
    consumer_auto_offset_reset="earliest",
    processing_guarantee="at_least_once",
    producer_linger_ms=5,
    producer_max_batch_size=256 * 1024,
    stream_buffer_maxsize=16384,
    broker_commit_every=10_000,
    broker_commit_interval=1.0,
    stream_wait_empty=False,
)


def _raw_topic(*names: str) -> faust.TopicT:
    # Raw bytes: faust never decodes (a decode error would crash the agent); the worker does,
    # and dead-letters what it cannot read. internal=True lets faust create missing topics
    # with our partition count.
    return app.topic(
        *names,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.partitions,
        internal=True,
    )


inputs = _raw_topic(*settings.input_topics, settings.ticks_topic)
ticks = _raw_topic(settings.ticks_topic)
samples = _raw_topic(settings.samples_topic)
dead_letters = _raw_topic(settings.dead_letters_topic)
forwards = {name: _raw_topic(name) for name in settings.input_topics}
join_state = app.Table(
    "join_state", key_type=bytes, value_type=bytes, partitions=settings.partitions
)
# Raw bytes in the changelog (faust would pick json for a non-Record type); set before the
# changelog topic and the store are first built, which read these lazily.
cast(Any, join_state).key_serializer = cast(Any, join_state).value_serializer = "raw"
counter_events = app.channel()

worker = JoinWorker(
    settings.join_config(),
    settings.decode_limits(),
    settings.input_topics,
    idle_timeout_ms=settings.idle_timeout_ms,
)


output = BatchOutput(OutputSettings(settings.kafka_bootstrap))
sink = OutputSink(
    output,
    samples_topic=settings.samples_topic,
    dead_letters_topic=settings.dead_letters_topic,
    input_partitions=settings.partitions,
    counters=settings.counters_enabled,
)
table = ChangelogTable(join_state.data, join_state.changelog_topic.get_topic_name(), output)
# faust can skip or replay input records around a recovery (see stream/gaps.py)
guard = OffsetGuard()
gap_reader = RangeReader(settings.kafka_bootstrap)
committed_reader = CommittedReader(settings.kafka_bootstrap)
commit_watch = {"next_check": 0.0}
health_client = redis.asyncio.Redis.from_url(settings.redis_url, socket_timeout=2.0)
health_key = KeySpace(settings.namespace).health(settings.health_process)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _handle(event: faust.EventT[bytes], now_ms: int) -> None:
    msg = event.message
    table.partition = sink.partition = msg.partition
    if msg.topic == settings.ticks_topic:
        worker.on_tick(msg.partition, table=table, sink=sink, now_ms=now_ms)
    else:
        worker.on_record(
            msg.topic,
            msg.partition,
            msg.offset,
            msg.key,
            msg.value,
            table=table,
            sink=sink,
            now_ms=now_ms,
        )


async def _handle_batch(events: list[faust.EventT[bytes]], now_ms: int) -> list[Message]:
    """Apply a batch, skipping faust's replays and first reading what faust skipped.

    Returns the records read to fill gaps: they are acknowledged to faust (so its commits can
    pass them) once the output is flushed.
    """
    repaired: list[Message] = []
    replayed = 0
    for event in events:
        msg = event.message
        if msg.topic != settings.ticks_topic:
            admission = guard.admit(msg.topic, msg.partition, msg.offset)
            if admission.missing_from is not None:
                start = admission.missing_from
                repaired += await _repair(msg.topic, msg.partition, start, msg.offset, now_ms)
            if not admission.apply:
                replayed += 1
                continue
        _handle(event, now_ms)
    if replayed:
        worker.metrics.anomaly("faust_replayed", replayed)
        logger.info("skipped %s records faust delivered again", replayed)
    return repaired


async def _repair(topic: str, partition: int, start: int, end: int, now_ms: int) -> list[Message]:
    """Apply the records of ``[start, end)`` that faust skipped, read straight from Kafka."""
    records = await gap_reader.read(topic, partition, start, end)
    logger.warning(
        "faust skipped %s[%s] offsets %s..%s: applied %s records read from Kafka",
        topic,
        partition,
        start,
        end - 1,
        len(records),
    )
    worker.metrics.anomaly("faust_skipped", len(records))
    table.partition = sink.partition = partition
    out = []
    for r in records:
        worker.on_record(
            topic, partition, r.offset, r.key, r.value, table=table, sink=sink, now_ms=now_ms
        )
        ts = r.timestamp / 1000.0
        out.append(
            Message(topic, partition, r.offset, ts, r.timestamp_type, None, r.key, r.value, None)
        )
    return out


async def _unstall_commits() -> None:
    """Commit what faust's stuck commit bookkeeping no longer will (see stream/gaps.py).

    Checked at most once a second, after a flush (everything below the guard's expected
    offsets is then applied and durable). Commits through faust 0.15.3's
    ``Consumer._commit_offsets`` (no public call commits given offsets), which also brings its
    bookkeeping up to date.
    """
    now = time.monotonic()
    if now < commit_watch["next_check"]:
        return
    commit_watch["next_check"] = now + 1.0
    committed = await committed_reader.read(settings.app_id)
    stuck: dict[TP, int] = {}
    for tp in list(guard.expected):
        offsets = guard.stalled(tp, committed.get(tp), now)
        if offsets is not None:
            stuck[TP(*tp)] = offsets.stop
            logger.warning(
                "commits of %s[%s] stuck at %s: committing %s", *tp, offsets.start, offsets.stop
            )
    if stuck:
        worker.metrics.anomaly("faust_commit_stall", len(stuck))
        await cast(Any, app.consumer)._commit_offsets(stuck)


@app.agent(inputs)
async def join(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
    """Join impressions, clicks and follow-on clicks into samples, a batch of records at a time."""
    await output.start()
    # create the output topics if missing (as faust's own sends would), then size them
    for topic in (samples, dead_letters, *forwards.values()):
        await topic.maybe_declare()
    await sink.size(list(forwards))
    batches = cast(faust.Stream[bytes], stream).take_events  # StreamT does not declare it
    try:
        async for events in batches(settings.batch_size, within=settings.batch_within_s):
            repaired = await _handle_batch(list(events), _now_ms())
            # durable before faust acks this batch's input (it does when we ask for the next)
            await output.flush()
            held = worker.unconfirmed_partitions()
            for partition in held:  # samples acknowledged: write their states, event times
                table.partition = partition
                worker.confirm(partition, table)
            if held:
                await output.flush()
            for message in repaired:  # durable now: faust may commit past them
                app.consumer.ack(message)
            await _unstall_commits()
            if sink.counters:
                batch, sink.counters = sink.counters, []
                await counter_events.send(value=batch)
            yield None
    finally:
        await output.stop()
        await gap_reader.stop()
        await committed_reader.stop()


@app.agent(counter_events)
async def write_counters(stream: faust.StreamT[Any]) -> AsyncIterator[None]:
    """Write live item counters to Redis in batches."""
    client = counter_client(settings.redis_url, timeout_s=2.0)
    writer = AsyncItemCounterWriter(client, namespace=settings.namespace)
    try:
        async for lists in stream.take(settings.counter_batch, within=settings.counter_within_s):
            events = [CounterEvent(*e) for batch in lists for e in batch]
            try:
                await writer.write(events)
            except redis.RedisError as exc:
                # counters are best effort: the join must not stop because Redis is away
                logger.warning("counter batch of %s dropped: %r", len(events), exc)
            yield None
    finally:
        await client.aclose()


async def send_ticks() -> None:
    """Send a tick into every assigned input partition so idle partitions still expire keys."""
    for tp in app.consumer.assignment():
        if tp.topic == settings.impressions_topic:
            ticks.send_soon(key=b"tick", value=b"", partition=tp.partition)


async def log_status() -> None:
    """One status line: throughput, samples per kind, dead letters, lateness, watermark lag.

    The line also goes to Redis under the health key with a TTL: `mtlstream stream --check`
    reads it, so a stalled worker turns unhealthy when the key expires.
    """
    worker.metrics.open_keys(worker.open_keys())
    line = f"{worker.metrics.status_line()} open_keys={worker.open_keys()}"
    logger.info("stream %s", line)
    try:
        await health_client.set(health_key, line, ex=settings.health_ttl_s)
    except redis.RedisError as exc:
        logger.warning("health key not written: %r", exc)


def on_assigned(sender: Any, /, *args: Any, signal: Any = None, **kwargs: Any) -> None:
    """Keep the deadline indexes of partitions we still own; the rest are rebuilt on return."""
    assigned: set[Any] = args[0] if args else kwargs.get("assigned", set())
    owned = {tp.partition for tp in assigned if tp.topic == settings.impressions_topic}
    worker.revoke({p for p in list(worker.tracker.partitions()) if p not in owned})
    guard.retain(owned)


async def start_metrics_server() -> None:
    """Expose Prometheus metrics when MTL_STREAM_METRICS_PORT is set."""
    if settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port)
        logger.info("metrics on :%s/metrics", settings.metrics_port)


# registered as calls, not decorators: faust's decorators are untyped
app.timer(interval=settings.tick_interval_s)(send_ticks)
app.timer(interval=settings.log_every_s)(log_status)
app.task(start_metrics_server)
app.on_partitions_assigned.connect(on_assigned)

if __name__ == "__main__":
    app.main()
