"""Traffic simulator: turns the synthetic world into event streams, files and Kafka records.

``generate`` yields ``(topic, key, value)`` in event-time order: impressions, clicks and
follow-on clicks interleaved by ``ts``, plus one truth record per impression on the truth
topic. ``run`` (what ``mtlstream simulate`` calls) writes them to JSONL files and, given a
bootstrap server, produces them to Kafka, paced and optionally salted with duplicates and
malformed records so the join's dedupe and dead letters get exercised.

Examples
--------
>>> from stream.world import WorldConfig
>>> config = SimConfig(world=WorldConfig(seed=1, n_users=50, n_items=80), max_impressions=20)
>>> records = list(generate(config))
>>> sum(topic == "impressions" for topic, _, _ in records)
20
>>> all(a[2]["ts"] <= b[2]["ts"] for a, b in zip(records, records[1:]))
True
"""

from __future__ import annotations

import dataclasses
import gzip
import heapq
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, Protocol, cast

import numpy as np
import orjson

from stream.world import CLICK, FOLLOW_CLICK, IMPRESSION, TRUTH, Request, World, WorldConfig

logger = logging.getLogger(__name__)

__all__ = [
    "Pacer",
    "ProducerLike",
    "Ranker",
    "SimConfig",
    "SimRecord",
    "SimStats",
    "generate",
    "inject_faults",
    "make_producer",
    "produce",
    "read_log",
    "read_truth",
    "run",
    "write_log",
]

# (topic, key = impression_id, value = the record's JSON object)
SimRecord = tuple[str, str, dict[str, Any]]
# A scorer plugged into the loop: a request in, the item ids to show (best first) out.
Ranker = Callable[[Request], Sequence[str]]
Pacing = Literal["sim", "wall", "none"]

BAD_REASONS = ("invalid_json", "missing_field", "wrong_type")
# Random streams of the run, apart from the world's own (spawn keys 0-4 in stream.world), so
# that changing the request rate or fault rates leaves the world's behaviour unchanged.
_ARRIVAL_STREAM = 5
_FAULT_STREAM = 6


def _child_rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream,)))


@dataclass(frozen=True)
class SimConfig:
    """Settings of one simulator run (the world's own parameters live in ``world``)."""

    world: WorldConfig = field(default_factory=WorldConfig)  # users, items, behaviour, delays
    duration_s: float | None = 3600.0  # simulated seconds of requests; None = no limit
    max_impressions: int | None = None  # stop after this many impressions; None = no limit
    speedup: float = 60.0  # simulated seconds per wall second when pacing="sim"
    target_eps: float = 1000.0  # events (impressions + clicks + follow-ons) per wall second
    # Kafka send pace: "sim" = event time / speedup (the clicks and follow-ons that trail the
    # last request are paced too, up to window + late time), "wall" = target_eps, "none".
    pacing: Pacing = "sim"
    impressions_topic: str = "impressions"  # DESIGN.md section 2 topic names
    clicks_topic: str = "clicks"
    follow_clicks_topic: str = "follow_clicks"
    truth_topic: str = "sim_truth"  # ground truth per impression (topic label, file, Kafka)
    produce_truth: bool = False  # also send truth records to Kafka on truth_topic
    bootstrap_servers: str | None = None  # Kafka "host:port[,...]"; None = files only
    log_file: Path | None = None  # JSONL event log ({"topic","key","value"} a line; .gz ok)
    truth_file: Path | None = None  # JSONL truth records, one object a line (.gz ok)
    dup_rate: float = 0.0  # share of Kafka event records sent twice (join dedupe test)
    bad_rate: float = 0.0  # share of Kafka event records followed by a malformed copy
    linger_ms: int = 20  # producer batching delay: bigger batches, more throughput
    batch_size: int = 256 * 1024  # producer batch bytes per partition
    acks: int | str = "all"  # producer acks: 0, 1 or "all" ("all" keeps idempotence on)
    compression_type: str | None = None  # producer compression ("gzip"; others need libs)
    progress_every_s: float = 10.0  # wall seconds between progress log lines

    def __post_init__(self) -> None:
        """Reject settings the run cannot honour, naming every bad one."""
        checks = {
            "duration_s > 0 or None": self.duration_s is None or self.duration_s > 0,
            "max_impressions >= 1 or None": self.max_impressions is None
            or self.max_impressions >= 1,
            "speedup > 0": self.speedup > 0,
            "target_eps > 0": self.target_eps > 0,
            "pacing in (sim, wall, none)": self.pacing in ("sim", "wall", "none"),
            "0 <= dup_rate <= 1": 0.0 <= self.dup_rate <= 1.0,
            "0 <= bad_rate <= 1": 0.0 <= self.bad_rate <= 1.0,
            "progress_every_s > 0": self.progress_every_s > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid SimConfig: {', '.join(bad)}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SimConfig:
        """Build a config from flat ``name -> value`` pairs (world fields included).

        Examples
        --------
        >>> SimConfig.from_dict({"seed": 7, "max_impressions": 10}).world.seed
        7
        """
        world_names = {f.name for f in dataclasses.fields(WorldConfig)}
        own_names = {f.name for f in dataclasses.fields(cls)} - {"world"}
        unknown = set(values) - world_names - own_names
        if unknown:
            raise ValueError(f"unknown simulator settings: {sorted(unknown)}")
        world = WorldConfig(**{k: v for k, v in values.items() if k in world_names})
        paths = {"log_file", "truth_file"}
        own: dict[str, Any] = {
            k: Path(v) if k in paths and v is not None else v
            for k, v in values.items()
            if k in own_names
        }
        return cls(world=world, **own)

    @property
    def event_topics(self) -> tuple[str, str, str]:
        """The three input topics of the join, in DESIGN.md order."""
        return (self.impressions_topic, self.clicks_topic, self.follow_clicks_topic)

    def topic_of(self, kind: str) -> str:
        """The topic a world event kind goes to."""
        return {
            IMPRESSION: self.impressions_topic,
            CLICK: self.clicks_topic,
            FOLLOW_CLICK: self.follow_clicks_topic,
            TRUTH: self.truth_topic,
        }[kind]


@dataclass
class SimStats:
    """What a run produced, per topic, and what went wrong on the way."""

    records: Counter[str] = field(default_factory=Counter)  # clean records per topic
    duplicates: int = 0  # extra copies sent (dup_rate)
    bad: Counter[str] = field(default_factory=Counter)  # malformed records sent, per reason
    send_errors: int = 0  # records Kafka did not acknowledge
    first_ts: int | None = None  # event-time span of the run, epoch ms
    last_ts: int | None = None
    wall_s: float = 0.0  # wall seconds the run took

    def count(self, topic: str, value: Mapping[str, Any]) -> None:
        """Count one clean record and widen the event-time span."""
        self.records[topic] += 1
        ts = int(value["ts"])
        self.first_ts = ts if self.first_ts is None else min(self.first_ts, ts)
        self.last_ts = ts if self.last_ts is None else max(self.last_ts, ts)

    def summary(self) -> str:
        """One ``key=value`` status line."""
        sim_s = (
            0.0 if self.first_ts is None or self.last_ts is None else self.last_ts - self.first_ts
        )
        parts = [f"{topic}={n}" for topic, n in sorted(self.records.items())]
        parts += [
            f"duplicates={self.duplicates}",
            f"bad={sum(self.bad.values())}",
            f"send_errors={self.send_errors}",
            f"sim_s={sim_s / 1000:.0f}",
            f"wall_s={self.wall_s:.1f}",
        ]
        return " ".join(parts)


def _request_interval_ms(config: SimConfig, world: World) -> float:
    """Mean simulated ms between requests so that events flow at target_eps wall-clock."""
    events_per_request = world.config.shown_per_request * world.expected_events_per_impression()
    events_per_sim_s = config.target_eps / config.speedup
    return 1000.0 * events_per_request / events_per_sim_s


def generate(
    config: SimConfig, ranker: Ranker | None = None, world: World | None = None
) -> Iterator[SimRecord]:
    """Yield simulated records in event-time order, truth records included.

    Requests arrive as a Poisson process; each shows ``ranker(request)`` (default: the
    world's own ranking) and schedules its impressions, truth, clicks and follow-ons. A record
    is yielded once no later request can produce an earlier one.

    Parameters
    ----------
    config
        Run settings; ``duration_s`` and ``max_impressions`` bound the requests (the clicks
        and follow-ons of the last impressions are still yielded, even past the duration).
    ranker
        Orders a request's candidates (item ids, best first; the top ``shown_per_request`` are
        shown). Plug a live scorer in here to close the loop.
    world
        A world to continue from; default a new one from ``config.world``.
    """
    world = World(config.world) if world is None else world
    arrival_rng = _child_rng(config.world.seed, _ARRIVAL_STREAM)
    interval_ms = _request_interval_ms(config, world)
    end_ms = None if config.duration_s is None else world.now_ms + config.duration_s * 1000
    pending: list[tuple[int, int, str, dict[str, Any]]] = []  # heap of (ts, seq, topic, value)
    seq = impressions = 0
    t = float(world.now_ms)
    while config.max_impressions is None or impressions < config.max_impressions:
        t += arrival_rng.exponential(interval_ms)
        if end_ms is not None and t > end_ms:
            break
        ts = int(t)
        yield from _pop_until(pending, ts)
        request = world.sample_request(ts)
        shown = list(ranker(request) if ranker else world.default_ranking(request))
        shown = shown[: world.config.shown_per_request]
        if config.max_impressions is not None:
            shown = shown[: config.max_impressions - impressions]
        for event in world.outcome(request, shown, ts):
            seq += 1
            heapq.heappush(pending, (event.ts, seq, config.topic_of(event.kind), event.value))
        impressions += len(shown)
    yield from _pop_until(pending, None)


def _pop_until(
    pending: list[tuple[int, int, str, dict[str, Any]]], ts: int | None
) -> Iterator[SimRecord]:
    """Yield buffered records with event time <= ``ts`` (all of them when ``ts`` is None)."""
    while pending and (ts is None or pending[0][0] <= ts):
        _, _, topic, value = heapq.heappop(pending)
        yield topic, str(value["impression_id"]), value


def encode(value: Mapping[str, Any]) -> bytes:
    """The wire form of a record value: compact UTF-8 JSON."""
    return orjson.dumps(value)


def _open(path: Path, mode: Literal["rb", "wb"]) -> IO[bytes]:
    if path.suffix == ".gz":
        # GzipFile reads and writes bytes like any binary file; typeshed just does not say IO.
        return cast(IO[bytes], gzip.open(path, mode))
    return path.open(mode)


def write_log(records: Iterable[SimRecord], path: Path) -> int:
    """Write records to a JSONL event log, one ``{"topic","key","value"}`` a line; count them.

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "events.jsonl"
    >>> write_log([("clicks", "a", {"impression_id": "a", "ts": 1})], path)
    1
    >>> list(read_log(path))
    [('clicks', 'a', {'impression_id': 'a', 'ts': 1})]
    """
    n = 0
    with _open(path, "wb") as out:
        for topic, key, value in records:
            out.write(orjson.dumps({"topic": topic, "key": key, "value": value}) + b"\n")
            n += 1
    return n


def read_log(path: Path) -> Iterator[SimRecord]:
    """Read back a JSONL event log written by ``write_log`` or ``run``."""
    with _open(path, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            row = orjson.loads(line)
            if not isinstance(row, dict) or not {"topic", "key", "value"} <= row.keys():
                raise ValueError(f"{path}:{number}: not an event log line")
            yield str(row["topic"]), str(row["key"]), dict(row["value"])


def read_truth(path: Path) -> Iterator[dict[str, Any]]:
    """Read back a JSONL truth file: one truth object per impression."""
    with _open(path, "rb") as lines:
        for line in lines:
            if line.strip():
                yield dict(orjson.loads(line))


def _corrupt(value: Mapping[str, Any], reason: str) -> bytes:
    """A malformed copy of a record: what a buggy producer might send."""
    if reason == "invalid_json":
        raw = encode(value)
        return raw[: max(1, len(raw) // 2)]  # cut mid-object: never parses
    broken = dict(value)
    if reason == "missing_field":
        del broken["ts"]
    else:
        broken["ts"] = str(broken["ts"])  # wrong_type: a string where an int belongs
    return encode(broken)


def inject_faults(
    records: Iterable[SimRecord],
    event_topics: Iterable[str],
    dup_rate: float,
    bad_rate: float,
    seed: int,
    stats: SimStats | None = None,
) -> Iterator[tuple[str, bytes, bytes]]:
    """Encode records for Kafka, adding duplicates and malformed copies on event topics.

    Every clean record goes through once, as ``(topic, key bytes, value bytes)``. After it,
    with probability ``dup_rate`` the same bytes again, and with probability ``bad_rate`` a
    malformed copy (invalid JSON, a missing ``ts``, or ``ts`` as a string) with the same key.
    Records on other topics (truth) pass through untouched.
    """
    rng = _child_rng(seed, _FAULT_STREAM)
    faulty = set(event_topics)
    for topic, key, value in records:
        key_bytes, raw = key.encode(), encode(value)
        yield topic, key_bytes, raw
        if topic not in faulty:
            continue
        if dup_rate and rng.random() < dup_rate:
            if stats is not None:
                stats.duplicates += 1
            yield topic, key_bytes, raw
        if bad_rate and rng.random() < bad_rate:
            reason = BAD_REASONS[int(rng.integers(len(BAD_REASONS)))]
            if stats is not None:
                stats.bad[reason] += 1
            yield topic, key_bytes, _corrupt(value, reason)


class Pacer:
    """Holds a producer back to a pace: the simulated clock, a fixed rate, or none.

    ``"sim"`` sends an event when the wall clock reaches its event time divided by ``speedup``
    (from the first event); ``"wall"`` sends the n-th event at ``n / target_eps`` seconds;
    ``"none"`` never waits. ``clock`` and ``sleep`` are injectable for tests.

    Examples
    --------
    >>> now = [0.0]
    >>> def sleep(seconds: float) -> None:
    ...     now[0] += seconds
    >>> pacer = Pacer("wall", 1.0, 100.0, clock=lambda: now[0], sleep=sleep)
    >>> for ts in range(201):
    ...     pacer.wait(ts)
    >>> round(now[0], 2)
    2.0
    """

    def __init__(
        self,
        mode: Pacing,
        speedup: float,
        target_eps: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        min_sleep_s: float = 0.002,
    ) -> None:
        if mode not in ("sim", "wall", "none") or speedup <= 0 or target_eps <= 0:
            raise ValueError(f"bad pace: mode={mode!r} speedup={speedup} target_eps={target_eps}")
        self.mode = mode
        self.speedup = speedup
        self.target_eps = target_eps
        self._clock = clock
        self._sleep = sleep
        self._min_sleep_s = min_sleep_s  # sleeping per event would cost more than it paces
        self._start: tuple[float, int] | None = None  # (wall s, event ts ms) of the first event
        self._n = 0

    def wait(self, ts_ms: int) -> None:
        """Block until the event with time ``ts_ms`` is due."""
        if self.mode == "none":
            return
        if self._start is None:
            self._start = (self._clock(), ts_ms)
        wall0, ts0 = self._start
        if self.mode == "sim":
            due = wall0 + (ts_ms - ts0) / 1000.0 / self.speedup
        else:
            due = wall0 + self._n / self.target_eps
        self._n += 1
        ahead = due - self._clock()
        if ahead >= self._min_sleep_s:
            self._sleep(ahead)


class ProducerLike(Protocol):
    """The part of ``kafka.KafkaProducer`` the simulator uses (a fake fits in tests)."""

    def send(self, topic: str, value: bytes | None = None, key: bytes | None = None) -> Any:
        """Queue one record; return a future with ``add_errback``."""
        ...

    def flush(self, timeout: float | None = None) -> None:
        """Block until every queued record is acknowledged or failed."""
        ...

    def close(self, timeout: float | None = None) -> None:
        """Flush and release the connection."""
        ...


def make_producer(config: SimConfig) -> ProducerLike:
    """A ``KafkaProducer`` tuned for throughput from the run's settings."""
    from kafka import KafkaProducer  # deferred: offline runs and unit tests never need it

    if not config.bootstrap_servers:
        raise ValueError("make_producer needs bootstrap_servers")
    producer: ProducerLike = KafkaProducer(
        bootstrap_servers=config.bootstrap_servers.split(","),
        client_id="mtlstream-simulator",
        linger_ms=config.linger_ms,
        batch_size=config.batch_size,
        acks=config.acks,
        # kafka-python enables idempotence by default and warns when acks conflict with it.
        enable_idempotence=config.acks == "all",
        compression_type=config.compression_type,
    )
    return producer


def produce(
    config: SimConfig,
    records: Iterable[SimRecord] | None = None,
    producer: ProducerLike | None = None,
    pacer: Pacer | None = None,
    stats: SimStats | None = None,
) -> SimStats:
    """Send records (default: ``generate(config)``) to Kafka, keyed by impression_id.

    Event records are paced (``config.pacing``) and salted with duplicates and malformed
    copies (``config.dup_rate``, ``config.bad_rate``); truth records go to
    ``config.truth_topic`` only when ``config.produce_truth``. The producer (default: one
    from ``make_producer``) is flushed and, when created here, closed.
    """
    stats = SimStats() if stats is None else stats
    records = generate(config) if records is None else records
    pacer = pacer or Pacer(config.pacing, config.speedup, config.target_eps)
    own_producer = producer is None
    producer = make_producer(config) if producer is None else producer
    started = time.monotonic()

    def on_error(exc: BaseException) -> None:
        stats.send_errors += 1
        if stats.send_errors <= 5:  # the first few say why; the summary has the count
            logger.warning("sim send failed error=%r", exc)

    def paced(items: Iterable[SimRecord]) -> Iterator[SimRecord]:
        for topic, key, value in items:
            if topic == config.truth_topic and not config.produce_truth:
                continue
            if topic != config.truth_topic:
                pacer.wait(int(value["ts"]))
            stats.count(topic, value)
            yield topic, key, value

    try:
        wire = inject_faults(
            paced(records),
            config.event_topics,
            config.dup_rate,
            config.bad_rate,
            config.world.seed,
            stats,
        )
        for topic, key, raw in wire:
            future = producer.send(topic, value=raw, key=key)
            future.add_errback(on_error)
        producer.flush()
    finally:
        if own_producer:
            producer.close()
    stats.wall_s = time.monotonic() - started
    return stats


class _Progress:
    """Periodic one-line progress reports (tqdm is not a dependency)."""

    def __init__(self, every_s: float, stats: SimStats) -> None:
        self.every_s = every_s
        self.stats = stats
        self.started = self.last = time.monotonic()

    def tick(self) -> None:
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self.stats.wall_s = now - self.started
            events = sum(self.stats.records.values())
            logger.info(
                "sim progress %s eps=%.0f", self.stats.summary(), events / self.stats.wall_s
            )


def _tee_files(
    records: Iterable[SimRecord], config: SimConfig, files: ExitStack
) -> Iterator[SimRecord]:
    """Pass records through, writing events to ``log_file`` and truth to ``truth_file``."""
    log = files.enter_context(_open(config.log_file, "wb")) if config.log_file else None
    truth = files.enter_context(_open(config.truth_file, "wb")) if config.truth_file else None
    for topic, key, value in records:
        if topic == config.truth_topic:
            if truth is not None:
                truth.write(encode(value) + b"\n")
        elif log is not None:
            log.write(orjson.dumps({"topic": topic, "key": key, "value": value}) + b"\n")
        yield topic, key, value


def run(
    config: SimConfig,
    ranker: Ranker | None = None,
    producer: ProducerLike | None = None,
    world: World | None = None,
) -> SimStats:
    """Run the simulator: generate, write the JSONL files, and produce to Kafka if configured.

    The event log holds the clean records (no injected duplicates or malformed copies).
    Without ``bootstrap_servers`` (and no ``producer``) nothing is paced: the files are
    written as fast as the world runs. Logs a progress line every ``progress_every_s``.
    ``world`` (default: a new one from ``config.world``) lets a ranker share the world it
    ranks for, e.g. to look up the truth of what it serves.
    """
    stats = SimStats()
    progress = _Progress(config.progress_every_s, stats)
    logger.info(
        "sim start seed=%s rho=%s users=%s items=%s kafka=%s log=%s truth=%s",
        config.world.seed,
        config.world.rho,
        config.world.n_users,
        config.world.n_items,
        config.bootstrap_servers,
        config.log_file,
        config.truth_file,
    )
    with ExitStack() as files:
        records = _tee_files(generate(config, ranker, world), config, files)
        ticking = _ticking(records, progress)
        if producer is None and not config.bootstrap_servers:
            for topic, _, value in ticking:
                stats.count(topic, value)
        else:
            produce(config, ticking, producer, stats=stats)
    stats.wall_s = time.monotonic() - progress.started
    logger.info("sim done %s", stats.summary())
    return stats


def _ticking(records: Iterable[SimRecord], progress: _Progress) -> Iterator[SimRecord]:
    for record in records:
        yield record
        progress.tick()
