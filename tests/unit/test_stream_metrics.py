"""StreamMetrics: the status line's tallies and the Prometheus metrics built from them."""

from __future__ import annotations

import gc

from prometheus_client import REGISTRY, generate_latest

from stream.metrics import StreamMetrics


def _scrape() -> str:
    return generate_latest(REGISTRY).decode()


def test_prometheus_shows_the_tallies_of_live_workers() -> None:
    metrics = StreamMetrics()
    for _ in range(3):
        metrics.event("impressions-t1")
    metrics.sample("final-t1")
    metrics.dead_letter("bad_json-t1")
    metrics.anomaly("late_click-t1", 2)
    metrics.watermark(917, 1234)
    text = _scrape()
    assert 'mtl_stream_events_total{topic="impressions-t1"} 3.0' in text
    assert 'mtl_stream_samples_total{kind="final-t1"} 1.0' in text
    assert 'mtl_stream_dead_letters_total{reason="bad_json-t1"} 1.0' in text
    assert 'mtl_stream_join_anomalies_total{name="late_click-t1"} 2.0' in text
    assert 'mtl_stream_watermark_lag_ms{partition="917"} 1234.0' in text
    assert "mtl_stream_repartitioned_total" in text
    assert "mtl_stream_open_keys" in text


def test_two_workers_in_one_process_add_up_and_a_dropped_one_leaves() -> None:
    first, second = StreamMetrics(), StreamMetrics()
    first.event("clicks-t2")
    second.event("clicks-t2")
    assert 'mtl_stream_events_total{topic="clicks-t2"} 2.0' in _scrape()
    del first, second
    gc.collect()
    assert "clicks-t2" not in _scrape()


def test_the_status_line_counts_samples_and_orphans() -> None:
    metrics = StreamMetrics()
    metrics.event("impressions")
    metrics.sample("final")
    metrics.anomaly("orphan", 2)
    line = metrics.status_line()
    assert "events=1 " in line
    assert "samples=1 " in line
    assert "samples_final=1" in line
    assert "orphans=2" in line
