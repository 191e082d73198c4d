"""The join worker's output: records buffered per topic-partition and sent as Kafka batches.

faust's ``topic.send_soon`` builds a future, a message object and a callback for every record,
which made the producer path most of the worker's cost. The worker's output (samples, join
state changelog, dead letters, repartitioned records) goes through :class:`BatchOutput` instead:
records are appended to per-partition buffers while a batch of input is handled, then
:meth:`BatchOutput.flush` sends each buffer as one or a few record batches and waits for the
broker's acknowledgement. The agent flushes before faust acks the input batch, so every record
derived from an acknowledged input is durable first (at-least-once).

Every record sent between two flushes shares one :class:`Generation`, whose ``done()`` turns
true when its flush succeeded; the worker uses it to hold back the join state that records an
emitted sample until that sample is acknowledged (see :mod:`stream.worker`).

A failed flush (broker away, timeout) keeps the buffers and tries again with backoff: nothing
is dropped, and the worker waits rather than acknowledging input it could not write out.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from feature_store.counters import CounterEvent
from stream.errors import StreamError
from stream.topics import partition_for

__all__ = [
    "BatchOutput",
    "ChangelogTable",
    "Generation",
    "OutputSettings",
    "OutputSink",
    "OversizedRecordError",
]

logger = logging.getLogger(__name__)

Record = tuple[bytes | None, bytes | None]  # (key, value); value None is a tombstone


class OversizedRecordError(StreamError):
    """A record larger than one record batch (the decoder's size cap makes this a bug)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"record of {size} bytes exceeds the {limit}-byte batch limit")


@dataclass(slots=True)
class Generation:
    """The records sent by one flush; ``done()`` once the broker acknowledged all of them."""

    acked: bool = False

    def done(self) -> bool:
        """Return whether every record of this generation is acknowledged."""
        return self.acked


@dataclass(frozen=True)
class OutputSettings:
    """Producer settings of the worker's output."""

    bootstrap_servers: str
    max_batch_bytes: int = 512 * 1024  # one record batch; below the broker's 1 MiB default
    request_timeout_ms: int = 30_000
    retry_backoff_s: float = 1.0  # first wait after a failed flush (doubles, up to 30 s)


@dataclass
class BatchOutput:
    """Buffers keyed records per (topic, partition) and sends them as record batches."""

    settings: OutputSettings
    producer: AIOKafkaProducer | None = None
    buffers: dict[tuple[str, int], list[Record]] = field(default_factory=lambda: defaultdict(list))
    generation: Generation = field(default_factory=Generation)
    sent: int = 0  # records acknowledged so far
    _partitions: dict[str, int] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one flush at a time

    async def start(self) -> None:
        """Connect the producer (idempotent)."""
        if self.producer is None:
            self.producer = AIOKafkaProducer(
                bootstrap_servers=self.settings.bootstrap_servers,
                acks="all",
                linger_ms=0,
                max_batch_size=self.settings.max_batch_bytes,
                request_timeout_ms=self.settings.request_timeout_ms,
            )
            await self.producer.start()

    async def stop(self) -> None:
        """Flush what is buffered, then close the producer."""
        if self.producer is not None:
            await self.flush()
            await self.producer.stop()
            self.producer = None

    async def partitions(self, topic: str) -> int:
        """Return the number of partitions of ``topic`` (cached after the first lookup)."""
        n = self._partitions.get(topic)
        if n is None:
            producer = await self._ready()
            n = self._partitions[topic] = len(await producer.partitions_for(topic))
        return n

    def add(self, topic: str, partition: int, key: bytes | None, value: bytes | None) -> Generation:
        """Buffer one record for ``topic`` / ``partition``; return the generation it belongs to."""
        self.buffers[(topic, partition)].append((key, value))
        return self.generation

    def pending(self) -> int:
        """Records buffered and not yet handed to a flush."""
        return sum(len(records) for records in self.buffers.values())

    async def flush(self) -> int:
        """Send every buffer and wait for the acknowledgements; return the records sent.

        Retries the whole flush with backoff until it succeeds (records of a partial success
        are sent twice, which at-least-once allows: sample ids and changelog keys make it
        harmless). Concurrent calls run one after the other.
        """
        async with self._lock:
            return await self._flush()

    async def _flush(self) -> int:
        # Take the buffers and the generation first: records added while this flush waits
        # (another task of the worker) belong to the next flush and the next generation.
        buffers, self.buffers = self.buffers, defaultdict(list)
        generation, self.generation = self.generation, Generation()
        n = sum(len(records) for records in buffers.values())
        backoff = self.settings.retry_backoff_s
        while n:
            try:
                await self._send_all(buffers)
                break
            except (TimeoutError, KafkaError) as exc:
                logger.warning(
                    "output flush of %s records failed (%r); retrying in %.1fs", n, exc, backoff
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
        generation.acked = True
        self.sent += n
        return n

    async def _ready(self) -> AIOKafkaProducer:
        await self.start()
        if self.producer is None:  # start() sets it; a concurrent stop() may have cleared it
            raise RuntimeError("the output producer is stopped")
        return self.producer

    async def _send_all(self, buffers: dict[tuple[str, int], list[Record]]) -> None:
        producer = await self._ready()
        futures: list[asyncio.Future[Any]] = []
        for (topic, partition), records in buffers.items():
            batch = producer.create_batch()
            for key, value in records:
                if batch.append(key=key, value=value, timestamp=None) is None:
                    # full: send it and continue in a new one (a record never exceeds the
                    # batch size: the decoder caps event sizes far below it)
                    futures.append(await producer.send_batch(batch, topic, partition=partition))
                    batch = producer.create_batch()
                    if batch.append(key=key, value=value, timestamp=None) is None:
                        raise OversizedRecordError(len(value or b""), self.settings.max_batch_bytes)
            futures.append(await producer.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*futures)


class OutputSink:
    """The join worker's :class:`stream.worker.Sink` over a :class:`BatchOutput`.

    Samples go to the input record's partition when the samples topic has as many partitions
    as the inputs (they are keyed by impression id, so that is where Kafka's partitioner would
    put them too); otherwise to the partition Kafka's partitioner picks. Set ``partition`` to
    the input partition being handled; call :meth:`size` once before the first record.
    """

    def __init__(
        self,
        output: BatchOutput,
        *,
        samples_topic: str,
        dead_letters_topic: str,
        input_partitions: int,
        counters: bool = True,
    ) -> None:
        self.output = output
        self.samples_topic = samples_topic
        self.dead_letters_topic = dead_letters_topic
        self.input_partitions = input_partitions
        self.counters_enabled = counters
        self.partition = 0  # the input partition being handled
        self.partitions: dict[str, int] = {}  # topic -> partition count
        self.counters: list[CounterEvent] = []

    async def size(self, forward_topics: list[str]) -> None:
        """Look up the partition counts of every topic the sink writes to."""
        for topic in (self.samples_topic, self.dead_letters_topic, *forward_topics):
            self.partitions[topic] = await self.output.partitions(topic)

    def _partition(self, topic: str, key: bytes) -> int:
        n = self.partitions[topic]
        return self.partition if n == self.input_partitions else partition_for(key, n)

    def sample(self, key: bytes, value: bytes) -> Generation:
        """Buffer a sample; its generation is done once the broker acknowledged it."""
        topic = self.samples_topic
        return self.output.add(topic, self._partition(topic, key), key, value)

    def dead_letter(self, value: bytes) -> None:
        """Buffer a dead letter (unkeyed; spread over partitions by input partition)."""
        topic = self.dead_letters_topic
        self.output.add(topic, self.partition % self.partitions[topic], None, value)

    def forward(self, topic: str, key: bytes, value: bytes) -> None:
        """Buffer a record re-keyed by impression id, for the partition that owns it."""
        self.output.add(topic, partition_for(key, self.partitions[topic]), key, value)

    def counter(self, item_id: str, kind: str, ts: int) -> None:
        """Collect a live item counter event (written to Redis by the caller, in batches)."""
        if self.counters_enabled:
            self.counters.append(CounterEvent(item_id, kind, ts))  # type: ignore[arg-type]


_NO_DEFAULT: Any = object()


class ChangelogTable(MutableMapping[bytes, bytes]):
    """The join state: a mapping whose changes are also buffered as changelog records.

    The records are raw key and value bytes (a ``None`` value deletes the key), written to
    changelog partition ``partition``: set it to the input partition being handled, which owns
    the key. faust's Table recovers from the same topic, and so does the direct engine.
    """

    def __init__(self, data: MutableMapping[bytes, bytes], topic: str, output: BatchOutput) -> None:
        self.data = data
        self.topic = topic
        self.output = output
        self.partition = 0

    def __getitem__(self, key: bytes) -> bytes:
        return self.data[key]

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.data[key] = value
        self.output.add(self.topic, self.partition, key, value)

    def __delitem__(self, key: bytes) -> None:
        del self.data[key]
        self.output.add(self.topic, self.partition, key, None)

    # MutableMapping's get and pop go through __getitem__ and a KeyError: a miss is the
    # common case (each new impression), so read the dict directly.
    def get(self, key: bytes, default: Any = None) -> Any:
        return self.data.get(key, default)

    def pop(self, key: bytes, default: Any = _NO_DEFAULT) -> Any:
        if key not in self.data:
            if default is _NO_DEFAULT:
                raise KeyError(key)
            return default
        value = self.data[key]
        del self[key]
        return value

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)
