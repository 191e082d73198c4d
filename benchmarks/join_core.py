"""Throughput of the pure join core (no Kafka, no faust), events per second.

Runs four loops and prints one key=value line each:

- ``baseline``: a dict get + set per event (the floor any keyed worker pays);
- ``step``: the join itself on decoded events: ``step`` per event, deadline index, ticks;
- ``worker_loop``: the same plus orjson decoding and the watermark tracker, i.e. the pure
  part of what the faust agent does per record;
- ``join_worker``: :class:`stream.worker.JoinWorker` itself over 4 partitions, as both engines
  drive it (table of encoded states, held-back writes confirmed every 2,000 records, sample
  encoding), with a dict for the table and a sink that acknowledges at once: everything the
  worker does per record but Kafka. It reads the simulator's log, the one
  ``benchmarks/stream_e2e.py`` replays, whose windows close while it is read (as in a live
  stream) rather than all at the end like the synthetic log of the other three.

Usage: ``python benchmarks/join_core.py [--impressions 100000] [--mode final|early]``
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream.events import (
    Click,
    DecodeLimits,
    Event,
    Features,
    FollowClick,
    Impression,
    decode_event,
    encode_event,
    topic_of,
)
from stream.join import JoinConfig, JoinState, deadline, step
from stream.topics import partition_for
from stream.watermark import DeadlineIndex, WatermarkTracker
from stream.worker import JoinWorker
from tests.integration.stream_harness import LogRecord, closing_impressions, simulated_log

T0 = 1_700_000_000_000


def make_events(n_impressions: int, seed: int) -> list[Event]:
    """A log like the simulator's: 1 impression per ~10 ms, 30 % clicked, some follow-ons."""
    rng = random.Random(seed)
    timed: list[tuple[int, int, Event]] = []
    for i in range(n_impressions):
        ts = T0 + i * 10 + rng.randrange(10)
        imp_id = f"imp-{i}"
        features: Features = {
            "user_segment": f"s{rng.randrange(8)}",
            "item_price": rng.random() * 100,
        }
        timed.append((ts, len(timed), Impression(imp_id, f"r{i}", "u", "i", ts, 0, features)))
        if rng.random() < 0.3:
            c = ts + rng.randrange(1_000, 120_000)
            timed.append((c, len(timed), Click(imp_id, c, f"c{i}")))
            for k in range(rng.choice([0, 0, 1, 2, 3])):
                f = c + rng.randrange(1_000, 600_000)
                timed.append((f, len(timed), FollowClick(imp_id, f, f"f{i}.{k}", "next")))
    timed.sort()
    return [event for _, _, event in timed]


def run_baseline(events: list[Event], config: JoinConfig) -> int:
    store: dict[str, int] = {}
    for event in events:
        key = event.impression_id
        store[key] = store.get(key, 0) + 1
    return len(store)


def run_step(events: list[Event], config: JoinConfig) -> int:
    states: dict[str, JoinState] = {}
    index = DeadlineIndex()
    lateness = config.allowed_lateness_ms
    emitted = 0
    max_ts = 0

    def apply(key: str, event: Event | None, watermark: int) -> int:
        result = step(states.get(key), event, watermark, config, now_ms=0)
        if result.state is None:
            states.pop(key, None)
        else:
            states[key] = result.state
        index.set(key, deadline(result.state, config))
        return len(result.samples)

    for event in events:
        max_ts = max(max_ts, event.ts)  # one partition, all topics in step
        watermark = max_ts - lateness
        emitted += apply(event.impression_id, event, watermark)
        for key in index.pop_due(watermark):
            emitted += apply(key, None, watermark)
    end = max_ts + 10**9  # the log ended: flush every open window
    for key in index.pop_due(end):
        emitted += apply(key, None, end)
    return emitted


def run_worker_loop(raws: list[tuple[str, bytes]], config: JoinConfig) -> int:
    states: dict[str, JoinState] = {}
    index = DeadlineIndex()
    tracker = WatermarkTracker(allowed_lateness_ms=config.allowed_lateness_ms)
    emitted = 0
    now = T0 + 10**10  # the decoder's wall clock: after every event time in the log
    for topic, raw in raws:
        event = decode_event(topic, raw, now_ms=now)
        tracker.observe(topic, 0, event.ts, now_ms=0)
        watermark = tracker.watermark(0, now_ms=0)
        todo: list[tuple[str, Event | None, int]] = [(event.impression_id, event, watermark)]
        todo += [(key, None, watermark) for key in index.pop_due(watermark)]
        emitted += _drain(todo, states, index, config)
    end = T0 + 10**12  # the log ended: flush every open window
    emitted += _drain([(key, None, end) for key in index.pop_due(end)], states, index, config)
    return emitted


def _drain(
    todo: list[tuple[str, Event | None, int]],
    states: dict[str, JoinState],
    index: DeadlineIndex,
    config: JoinConfig,
) -> int:
    emitted = 0
    for key, item, watermark in todo:
        result = step(states.get(key), item, watermark, config, now_ms=0)
        if result.state is None:
            states.pop(key, None)
        else:
            states[key] = result.state
        index.set(key, deadline(result.state, config))
        emitted += len(result.samples)
    return emitted


class _Acked:
    def done(self) -> bool:
        return True


class _NullSink:
    """A sink that counts samples and acknowledges every one at once."""

    def __init__(self) -> None:
        self.samples = 0
        self.acked = _Acked()

    def sample(self, key: bytes, value: bytes) -> _Acked:
        self.samples += 1
        return self.acked

    def dead_letter(self, value: bytes) -> None:
        pass

    def forward(self, topic: str, key: bytes, value: bytes) -> None:
        pass

    def counter(self, item_id: str, kind: str, ts: int) -> None:
        pass


PARTITIONS = 4


def partitioned(log: list[LogRecord]) -> list[tuple[str, int, bytes, bytes]]:
    """The log's records with their input partition (as Kafka's partitioner assigns them), then
    one far-future impression per partition so that every window closes."""
    log = log + closing_impressions(PARTITIONS, T0 + 10**10)
    return [(kind, partition_for(key, PARTITIONS), key, raw) for kind, key, raw in log]


def run_join_worker(records: list[tuple[str, int, bytes, bytes]], config: JoinConfig) -> int:
    kinds = ("impressions", "clicks", "follow_clicks")
    worker = JoinWorker(config, DecodeLimits(), {k: k for k in kinds}, idle_timeout_ms=10**12)
    tables: dict[int, dict[bytes, bytes]] = {p: {} for p in range(PARTITIONS)}
    sink = _NullSink()
    now = T0 + 10**10  # the decoder's wall clock: after every event time in the log
    for offset, (topic, p, key, raw) in enumerate(records):
        worker.on_record(topic, p, offset, key, raw, table=tables[p], sink=sink, now_ms=now)
        if offset % 2000 == 1999:  # as an engine does after each flushed batch
            for q in worker.unconfirmed_partitions():
                worker.confirm(q, tables[q])
    for p in range(PARTITIONS):  # the log ended: every input idle, every window closes
        worker.on_tick(p, table=tables[p], sink=sink, now_ms=now + 10**13)
    return sink.samples


def timed(fn: Callable[[], int], n_events: int, repeat: int) -> tuple[float, int]:
    """Return the best events/s over ``repeat`` runs, and the function's result."""
    best = float("inf")
    out = 0
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return n_events / best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impressions", type=int, default=100_000)
    parser.add_argument("--mode", choices=["final", "early"], default="final")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    config = JoinConfig(mode=args.mode)
    events = make_events(args.impressions, args.seed)
    raws = [(topic_of(e), encode_event(e)) for e in events]
    n = len(events)
    print(f"events={n} impressions={args.impressions} mode={args.mode}")
    base, _ = timed(lambda: run_baseline(events, config), n, args.repeat)
    print(f"baseline events_per_s={base:,.0f}")
    rate, samples = timed(lambda: run_step(events, config), n, args.repeat)
    print(f"step events_per_s={rate:,.0f} samples={samples} vs_baseline={base / rate:.1f}x_slower")
    rate, samples = timed(lambda: run_worker_loop(raws, config), n, args.repeat)
    print(f"worker_loop events_per_s={rate:,.0f} samples={samples}")
    sim = partitioned(simulated_log(args.impressions, seed=1))
    rate, samples = timed(lambda: run_join_worker(sim, config), len(sim), args.repeat)
    print(f"join_worker events={len(sim)} events_per_s={rate:,.0f} samples={samples}")


if __name__ == "__main__":
    main()
