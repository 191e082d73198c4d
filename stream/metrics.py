"""Operator-facing counters of the stream worker: Prometheus metrics plus a status line.

Every count goes to a Prometheus metric (scraped from ``MTL_STREAM_METRICS_PORT``) and to a plain
tally that the periodic ``key=value`` log line and the tests read.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from functools import cache
from typing import Any

from prometheus_client import Counter, Gauge

__all__ = ["StreamMetrics"]

EVENTS_IN = Counter("mtl_stream_events_total", "Input records read", ["topic"])
SAMPLES_OUT = Counter("mtl_stream_samples_total", "Samples emitted", ["kind"])
DEAD_LETTERS = Counter("mtl_stream_dead_letters_total", "Records dead-lettered", ["reason"])
ANOMALIES = Counter(
    "mtl_stream_join_anomalies_total", "Late, duplicate, out-of-window, orphan events", ["name"]
)
REPARTITIONED = Counter("mtl_stream_repartitioned_total", "Records forwarded to their key")
WATERMARK_LAG = Gauge(
    "mtl_stream_watermark_lag_ms", "Wall clock minus watermark per partition", ["partition"]
)
OPEN_KEYS = Gauge("mtl_stream_open_keys", "Keys waiting for a deadline (all partitions)")


@cache
def _child(metric: Any, label: str) -> Any:
    """The labelled child of a metric, looked up once (``labels()`` costs microseconds)."""
    return metric.labels(label)


class StreamMetrics:
    """Counts of one worker, mirrored into Prometheus."""

    def __init__(self) -> None:
        self.events: Tally[str] = Tally()
        self.samples: Tally[str] = Tally()
        self.dead_letters: Tally[str] = Tally()
        self.anomalies: Tally[str] = Tally()
        self.repartitioned = 0
        self.watermark_lag_ms: dict[int, int] = {}
        self._last_log = time.monotonic()
        self._last_counts = (0, 0)

    def event(self, topic: str) -> None:
        """One input record was read."""
        self.events[topic] += 1
        _child(EVENTS_IN, topic).inc()

    def sample(self, kind: str) -> None:
        """One sample was emitted."""
        self.samples[kind] += 1
        _child(SAMPLES_OUT, kind).inc()

    def dead_letter(self, reason: str) -> None:
        """One record went to dead letters."""
        self.dead_letters[reason] += 1
        _child(DEAD_LETTERS, reason).inc()

    def anomaly(self, name: str, n: int = 1) -> None:
        """Count join anomalies (``late_click``, ``duplicate_follow``, ...)."""
        self.anomalies[name] += n
        _child(ANOMALIES, name).inc(n)

    def repartition(self) -> None:
        """One record was forwarded to the partition of its impression id."""
        self.repartitioned += 1
        REPARTITIONED.inc()

    def watermark(self, partition: int, lag_ms: int) -> None:
        """Record a partition's watermark lag behind the wall clock."""
        self.watermark_lag_ms[partition] = lag_ms
        _child(WATERMARK_LAG, str(partition)).set(lag_ms)

    def open_keys(self, n: int) -> None:
        """Record how many keys wait for a deadline."""
        OPEN_KEYS.set(n)

    def status_line(self) -> str:
        """One ``key=value`` line with totals and rates since the previous line."""
        now = time.monotonic()
        events, samples = sum(self.events.values()), sum(self.samples.values())
        elapsed = max(now - self._last_log, 1e-9)
        ev_rate = (events - self._last_counts[0]) / elapsed
        sa_rate = (samples - self._last_counts[1]) / elapsed
        self._last_log, self._last_counts = now, (events, samples)
        lag = max(self.watermark_lag_ms.values(), default=0)
        parts = [
            f"events={events}",
            f"events_per_s={ev_rate:.0f}",
            f"samples={samples}",
            f"samples_per_s={sa_rate:.0f}",
            *(f"samples_{k}={v}" for k, v in sorted(self.samples.items())),
            f"dead_letters={sum(self.dead_letters.values())}",
            f"orphans={self.anomalies['orphan'] + self.anomalies['orphan_overflow']}",
            f"late={sum(v for k, v in self.anomalies.items() if k.startswith('late'))}",
            f"repartitioned={self.repartitioned}",
            f"watermark_lag_ms={lag}",
        ]
        return " ".join(parts)
