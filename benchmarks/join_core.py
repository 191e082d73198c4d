"""Throughput of the pure join core (no Kafka, no faust), events per second.

Runs three loops over the same synthetic event log and prints one key=value line each:

- ``baseline``: a dict get + set per event (the floor any keyed worker pays);
- ``step``: the join itself on decoded events: ``step`` per event, deadline index, ticks;
- ``worker_loop``: the same plus orjson decoding and the watermark tracker, i.e. the pure
  part of what the faust agent does per record.

Usage: ``python benchmarks/join_core.py [--impressions 100000] [--mode final|early]``
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

from stream.events import (
    Click,
    Event,
    Features,
    FollowClick,
    Impression,
    decode_event,
    encode_event,
    topic_of,
)
from stream.join import JoinConfig, JoinState, deadline, step
from stream.watermark import DeadlineIndex, WatermarkTracker

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


if __name__ == "__main__":
    main()
