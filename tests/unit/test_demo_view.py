"""The live view: numbers from readings (pure), text from numbers."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest

from demo.monitor import Reading, ScorerReading
from demo.view import build_view, render, status_line

NAN = float("nan")
BUCKETS = (0.001, 0.002, 0.005, 0.01, math.inf)


def scorer(counts: list[float], version: int = 3) -> ScorerReading:
    """Cumulative latency buckets from per-bucket counts."""
    cumulative, total = [], 0.0
    for le, n in zip(BUCKETS, counts, strict=True):
        total += n
        cumulative.append((le, total))
    return ScorerReading(version, 2.5, cumulative, total)


def reading(t: float, offsets: dict[str, int], **extra: Any) -> Reading:
    values: dict[str, Any] = {
        "t": t,
        "offsets": offsets,
        "oracle": {},
        "oracle_samples": 0,
        "learner": None,
        "scorer": None,
        "served_requests": 0,
        "served_fallbacks": {},
        "served_auc": NAN,
        "freshness": (NAN, NAN, NAN, 0),
    }
    values.update(extra)
    return Reading(**values)


def test_rates_are_per_second_between_two_readings() -> None:
    before = reading(10.0, {"impressions": 100, "samples": 40, "clicks": 5})
    now = reading(14.0, {"impressions": 900, "samples": 440, "clicks": 5})
    view = build_view(now, before, 60.0, {})
    rates = {row.kind: (row.total, row.per_s) for row in view.topics}
    assert rates == {"impressions": (900, 200.0), "clicks": (5, 0.0), "samples": (440, 100.0)}
    # without an earlier reading there is no rate yet
    assert all(math.isnan(r.per_s) for r in build_view(now, None, 60.0, {}).topics)


def test_metric_rows_put_the_model_next_to_the_oracle() -> None:
    learner = {
        "samples": 5000,
        "lag": 12,
        "version": 4,
        "samples_per_s": 250.5,
        "metrics": {"ctr.auc_w": 0.71, "ctr.logloss_w": 0.3, "ysl.mse_w": 1.5},
    }
    oracle = {"ctr.auc_w": 0.8, "ctr.logloss_w": 0.25, "cvr.auc_w": 0.75, "ysl.mse_w": 1.1}
    view = build_view(reading(5.0, {}, learner=learner, oracle=oracle), None, 60.0, {})
    rows = {(r.task, r.metric): (r.model, r.oracle) for r in view.metrics}
    assert rows[("ctr", "AUC")] == (0.71, 0.8)
    assert rows[("ctr", "logloss")] == (0.3, 0.25)
    assert rows[("ysl", "MSE")] == (1.5, 1.1)
    model, oracle_cvr = rows[("cvr", "AUC")]
    assert math.isnan(model) and oracle_cvr == 0.75
    assert set(rows) == {(t, m) for t in ("ctr", "cvr", "ctcvr") for m in ("AUC", "logloss")} | {
        ("ysl", "MSE")
    }
    assert (view.learner_samples, view.learner_lag, view.learner_version) == (5000, 12, 4)
    assert view.learner_rate == 250.5


def test_latency_is_of_the_requests_since_the_previous_reading() -> None:
    old = scorer([100, 0, 0, 0, 0])  # 100 fast requests
    new = scorer([100, 0, 0, 50, 0])  # then 50 slow ones (5-10 ms)
    view = build_view(reading(2.0, {}, scorer=new), reading(1.0, {}, scorer=old), 60.0, {})
    p50, p99 = view.latency_ms
    assert 5.0 <= p50 <= 10.0 and 5.0 <= p99 <= 10.0
    overall, _ = build_view(reading(2.0, {}, scorer=new), None, 60.0, {}).latency_ms
    assert overall < 1.0  # overall, two thirds of the requests took under 1 ms
    assert view.scorer_version == 3 and view.model_age_s == 2.5


def test_render_and_status_line_show_the_numbers() -> None:
    now = reading(
        75.0,
        {"impressions": 12345, "samples": 10000},
        served_requests=1500,
        served_fallbacks={"no_model": 40, "ConnectError": 2},
        served_auc=0.6543,
        freshness=(3.21, 6.5, 7.9, 9000),
        oracle={"ctr.auc_w": 0.85},
        oracle_samples=9999,
        scorer=scorer([10, 20, 5, 0, 0]),
    )
    view = build_view(now, reading(73.0, {"impressions": 12000, "samples": 9800}), 180.0, {})
    text = render(view, "demo r1")
    plain = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)
    assert text.startswith("\x1b[H\x1b[2J")
    assert "demo r1   1:15 / 3:00" in plain
    assert re.search(r"impressions\s+12,345\s+172\.5", plain)
    assert "fallbacks 42 (no_model 40, ConnectError 2)" in plain
    assert "0.654" in plain and "median 3.2 s" in plain and "n=9,000" in plain
    assert "0.8500" in plain  # the oracle's ctr AUC
    line = status_line(view)
    fields = dict(kv.split("=", 1) for kv in line.split())
    assert fields["impressions"] == "12345" and fields["served"] == "1500"
    assert fields["fallbacks"] == "42" and fields["served_auc"] == "0.654"
    assert fields["ctr_auc"] == "-" and fields["ctr_auc_oracle"] == "0.850"


@pytest.mark.parametrize("elapsed", [0.0, 59.9, 3600.0])
def test_render_never_fails_on_missing_data(elapsed: float) -> None:
    text = render(build_view(reading(elapsed, {}), None, 60.0, {"learn": "exit 2"}))
    assert "learn: exit 2" in text and "version -" in text
