"""Impression logging: every served candidate, with the features the model saw, to ``impressions``.

The request path only offers a :class:`ServedRequest` (references to what it already built) to
a bounded queue and never waits: when the queue is full (Kafka slow or down) the request's
impressions are dropped and counted in ``mtl_serve_impressions_dropped``. A background task
turns queued requests into Impression records (DESIGN.md section 2) and hands them to an aiokafka
producer, keyed by ``impression_id``.

``impression_id`` is deterministic: a hash of the request id, the item id and the position, so
a retried delivery of the same record dedupes in the join.

Examples
--------
>>> impression_id("req-1", "i9", 0)
'ecb73f9db40b6fbbd653b0696e170ac2'
>>> found = FieldRows(("item_price",), None, [[2.5], None])
>>> served = ServedRequest("req-1", "u1", 1_700_000_000_000, {}, 3,
...                        ("item_price",), ["i8", "i9"], found, [1, 0])
>>> [orjson.loads(value)["features"] for _, value in impression_records(served)]
[{'user_id': 'u1', 'item_id': 'i9'}, {'user_id': 'u1', 'item_price': 2.5, 'item_id': 'i8'}]
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from feature_store.store import FieldColumns, FieldRows
from serving.metrics import ServingMetrics
from serving.scorer import feature_rows

__all__ = [
    "ImpressionLogger",
    "ImpressionSink",
    "KafkaSink",
    "ServedRequest",
    "impression_id",
    "impression_records",
]

logger = logging.getLogger(__name__)


def impression_id(request_id: str, item_id: str, position: int) -> str:
    """Deterministic impression id: blake2b-128 of request id, item id and position, in hex."""
    raw = f"{request_id}\x1f{item_id}\x1f{position}".encode()
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


@dataclass(frozen=True)
class ServedRequest:
    """What one ranking answer served; built from objects the request path already has."""

    request_id: str
    user_id: str
    ts_ms: int  # serve time, epoch ms: the impressions' event time
    context: Mapping[str, Any]
    model_version: int
    # what the model read: its fields, the candidates and Redis' answer (None: defaults)
    fields: Sequence[str]
    item_ids: Sequence[str]
    found: FieldColumns | FieldRows | None
    # candidate indices served, best first: position p showed item_ids[order[p]]
    order: Sequence[int]


def impression_records(served: ServedRequest) -> list[tuple[bytes, bytes]]:
    """Encode the served candidates as ``impressions`` records: ``(key, JSON value)``."""
    # the rows are built here, off the request path; equal to what the model encoded
    rows = feature_rows(
        served.fields, served.user_id, served.item_ids, served.found, served.context
    )
    records = []
    for position, index in enumerate(served.order):
        features = rows[index]
        item_id = served.item_ids[index]
        imp_id = impression_id(served.request_id, item_id, position)
        value = {
            "impression_id": imp_id,
            "request_id": served.request_id,
            "user_id": served.user_id,
            "item_id": item_id,
            "ts": served.ts_ms,
            "position": position,
            "features": features,
            "context": served.context,
        }
        records.append((imp_id.encode(), orjson.dumps(value)))
    return records


class ImpressionSink(Protocol):
    """Where impression records go (Kafka in production, a fake in tests)."""

    async def start(self) -> None:
        """Connect; raise to be retried later."""
        ...

    async def send(self, key: bytes, value: bytes) -> None:
        """Hand one record over (it may be delivered later)."""
        ...

    async def stop(self) -> None:
        """Flush what was handed over, then disconnect."""
        ...


class KafkaSink:
    """An aiokafka producer writing to one topic; delivery failures are counted."""

    def __init__(self, bootstrap: str, topic: str, metrics: ServingMetrics) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.metrics = metrics
        self._producer: Any = None

    async def start(self) -> None:
        """Start the producer (created here: aiokafka binds the running loop)."""
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=20, acks=1)
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        self._producer = producer

    def _delivered(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            self.metrics.impressions_failed.inc()

    async def send(self, key: bytes, value: bytes) -> None:
        """Append to the producer's batch; waits only when its buffer is full."""
        future = await self._producer.send(self.topic, value=value, key=key)
        future.add_done_callback(self._delivered)

    async def stop(self) -> None:
        """Flush and stop the producer."""
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None


class ImpressionLogger:
    """A bounded, never-blocking queue in front of an :class:`ImpressionSink`."""

    def __init__(
        self,
        sink: ImpressionSink,
        metrics: ServingMetrics,
        max_queued: int = 10_000,
        retry_s: float = 1.0,
    ) -> None:
        if max_queued < 1:
            raise ValueError(f"max_queued must be >= 1, got {max_queued}")
        self.sink = sink
        self.metrics = metrics
        # impressions (not requests) allowed to wait; beyond it whole requests are dropped
        self.max_queued = max_queued
        # pause between attempts to start the sink (Kafka down at start-up)
        self.retry_s = retry_s
        self._queue: asyncio.Queue[ServedRequest] = asyncio.Queue()
        self._queued = 0
        self._started = False

    @property
    def queued(self) -> int:
        """Impressions waiting, including those being sent."""
        return self._queued

    def offer(self, served: ServedRequest) -> bool:
        """Queue a request's impressions without waiting; False (counted) when full."""
        n = len(served.order)
        if self._queued + n > self.max_queued:
            self.metrics.impressions_dropped.inc(n)
            return False
        self._queue.put_nowait(served)
        self._queued += n
        self.metrics.impressions_queued.set(self._queued)
        return True

    async def _start_sink(self) -> None:
        from aiokafka.errors import KafkaError

        while not self._started:
            try:
                await self.sink.start()
            except (KafkaError, OSError) as exc:
                logger.warning(
                    "impression sink not ready, retrying in %.1fs: %s", self.retry_s, exc
                )
                await asyncio.sleep(self.retry_s)
            else:
                self._started = True

    async def _send(self, served: ServedRequest) -> None:
        records = impression_records(served)
        sent = 0
        try:
            for key, value in records:
                await self.sink.send(key, value)
                sent += 1
        except Exception as exc:  # a producer error must not kill the logger; count and go on
            self.metrics.impressions_failed.inc(len(records) - sent)
            logger.warning("sending impressions failed: %s", exc)
        self.metrics.impressions_sent.inc(sent)

    async def run(self) -> None:
        """Start the sink (retrying), then send queued impressions forever (cancel to stop)."""
        await self._start_sink()
        while True:
            served = await self._queue.get()
            try:
                await self._send(served)
            finally:
                self._queued -= len(served.order)
                self.metrics.impressions_queued.set(self._queued)

    async def close(self) -> None:
        """Stop the sink (flushing what it holds); queued impressions not yet sent are lost."""
        if self._started:
            await self.sink.stop()
            self._started = False
