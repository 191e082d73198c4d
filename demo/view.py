"""The live view: :func:`build_view` turns readings into numbers, :func:`render` into text.

Both are pure: ``build_view`` diffs two :class:`demo.monitor.Reading` s (rates, recent latency)
and picks what to show; ``render`` lays it out with plain ANSI escapes (no dependency), and
``status_line`` is the one-line ``key=value`` form logged when the view is off.

Examples
--------
>>> from demo.monitor import Reading
>>> def reading(t: float, impressions: int) -> Reading:
...     return Reading(t, {"impressions": impressions}, {}, 0, None, None, 0, {}, float("nan"),
...                    (float("nan"),) * 3 + (0,))
>>> view = build_view(reading(12.0, 500), reading(10.0, 100), 60.0, {})
>>> view.topics[0]
TopicRow(kind='impressions', total=500, per_s=200.0)
>>> status_line(view).split()[:2]
['elapsed_s=12', 'impressions=500']
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from demo.metrics import histogram_quantile
from demo.monitor import ORACLE_TASKS, TOPIC_KINDS, Reading, ScorerReading

__all__ = ["MetricRow", "TopicRow", "ViewData", "build_view", "render", "status_line"]

_BOLD, _DIM, _RESET = "\x1b[1m", "\x1b[2m", "\x1b[0m"
_CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen
# (metric key suffix in the progressive-validation dicts, label) per task kind
_SHOWN = {"binary": (("auc_w", "AUC"), ("logloss_w", "logloss")), "count": (("mse_w", "MSE"),)}


@dataclass(frozen=True)
class TopicRow:
    """Records in one topic and their recent rate."""

    kind: str
    total: int
    per_s: float


@dataclass(frozen=True)
class MetricRow:
    """One metric of one task: the learner's model next to the oracle (windowed)."""

    task: str
    metric: str
    model: float
    oracle: float


@dataclass(frozen=True)
class ViewData:
    """What one frame of the view shows."""

    elapsed_s: float
    duration_s: float
    topics: list[TopicRow]
    learner_samples: int | None
    learner_rate: float | None  # records/s over the learner's last status period
    learner_lag: int | None
    learner_version: int | None
    metrics: list[MetricRow]
    oracle_samples: int
    scorer_version: int | None
    model_age_s: float | None
    latency_ms: tuple[float, float]  # p50, p99 since the previous reading (else overall)
    served_requests: int
    fallbacks: Mapping[str, int]
    served_auc: float
    freshness: tuple[float, float, float, int]  # median, p95, max (s), samples covered
    children: Mapping[str, str]  # process name -> state


def _rate(now: Reading, before: Reading | None, kind: str) -> float:
    if before is None or now.t <= before.t:
        return math.nan
    return (now.offsets.get(kind, 0) - before.offsets.get(kind, 0)) / (now.t - before.t)


def _int(record: Mapping[str, Any] | None, key: str) -> int | None:
    value = None if record is None else record.get(key)
    return int(value) if isinstance(value, int | float) else None


def _metric_rows(learner: Mapping[str, Any] | None, oracle: Mapping[str, float]) -> list[MetricRow]:
    model = (learner or {}).get("metrics") or {}
    rows = []
    for task, kind in ORACLE_TASKS.items():
        for key, label in _SHOWN.get(kind, ()):
            name = f"{task}.{key}"
            value = model.get(name)
            rows.append(
                MetricRow(
                    task,
                    label,
                    float(value) if isinstance(value, int | float) else math.nan,
                    float(oracle.get(name, math.nan)),
                )
            )
    return rows


def _latency(now: ScorerReading | None, before: ScorerReading | None) -> tuple[float, float]:
    """p50 and p99 (ms) of the requests between two readings, else of all requests so far."""
    if now is None:
        return math.nan, math.nan
    buckets = now.buckets
    if before is not None and now.requests > before.requests:
        old = dict(before.buckets)
        buckets = [(le, count - old.get(le, 0.0)) for le, count in now.buckets]
    return (
        1000.0 * histogram_quantile(0.5, buckets),
        1000.0 * histogram_quantile(0.99, buckets),
    )


def build_view(
    now: Reading, before: Reading | None, duration_s: float, children: Mapping[str, str]
) -> ViewData:
    """The frame for reading ``now``, with rates against the earlier reading ``before``."""
    topics = [TopicRow(k, int(now.offsets.get(k, 0)), _rate(now, before, k)) for k in TOPIC_KINDS]
    rate = None if now.learner is None else now.learner.get("samples_per_s")
    scorer = now.scorer
    return ViewData(
        elapsed_s=now.t,
        duration_s=duration_s,
        topics=[t for t in topics if t.kind in now.offsets],
        learner_samples=_int(now.learner, "samples"),
        learner_rate=float(rate) if isinstance(rate, int | float) else None,
        learner_lag=_int(now.learner, "lag"),
        learner_version=_int(now.learner, "version"),
        metrics=_metric_rows(now.learner, now.oracle),
        oracle_samples=now.oracle_samples,
        scorer_version=None if scorer is None else scorer.version,
        model_age_s=None if scorer is None else scorer.age_s,
        latency_ms=_latency(scorer, None if before is None else before.scorer),
        served_requests=now.served_requests,
        fallbacks=dict(now.served_fallbacks),
        served_auc=now.served_auc,
        freshness=now.freshness,
        children=dict(children),
    )


def _num(value: float | int | None, fmt: str = ",.0f", unit: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:{fmt}}{unit}"


def _clock(seconds: float) -> str:
    whole = max(0, int(seconds))
    return f"{whole // 60}:{whole % 60:02d}"


def _fallbacks(fallbacks: Mapping[str, int]) -> str:
    total = sum(fallbacks.values())
    if not total:
        return "0"
    parts = ", ".join(f"{k} {v:,}" for k, v in sorted(fallbacks.items(), key=lambda kv: -kv[1]))
    return f"{total:,} ({parts})"


def _topic_lines(view: ViewData) -> list[str]:
    lines = [f"{_BOLD}events{_RESET}            total        /s"]
    for row in view.topics:
        lines.append(f"  {row.kind:<14}{_num(row.total):>10}{_num(row.per_s, ',.1f'):>10}")
    return lines


def _metric_lines(view: ViewData) -> list[str]:
    lines = [
        f"{_BOLD}progressive validation{_RESET} {_DIM}(rolling window; oracle = true "
        f"probabilities on the same samples, n={view.oracle_samples:,}){_RESET}",
        f"  {'task':<7}{'metric':<9}{'model':>9}{'oracle':>9}",
    ]
    for row in view.metrics:
        lines.append(
            f"  {row.task:<7}{row.metric:<9}{_num(row.model, '.4f'):>9}{_num(row.oracle, '.4f'):>9}"
        )
    return lines


def render(view: ViewData, title: str = "mtlstream demo") -> str:
    """The whole frame as text with ANSI escapes, starting with a screen clear."""
    median, p95, worst, n_fresh = view.freshness
    p50, p99 = view.latency_ms
    lines = [
        f"{_BOLD}{title}{_RESET}   {_clock(view.elapsed_s)} / {_clock(view.duration_s)}",
        "",
        *_topic_lines(view),
        "",
        f"{_BOLD}learner{_RESET}   samples {_num(view.learner_samples)} "
        f"({_num(view.learner_rate)}/s)   lag {_num(view.learner_lag)}   "
        f"published version {_num(view.learner_version)}",
        *_metric_lines(view),
        "",
        f"{_BOLD}scorer{_RESET}    version {_num(view.scorer_version)}   "
        f"model age {_num(view.model_age_s, '.1f', ' s')}   "
        f"latency p50 {_num(p50, '.2f', ' ms')}  p99 {_num(p99, '.2f', ' ms')}",
        f"{_BOLD}served{_RESET}    {view.served_requests:,} requests   "
        f"fallbacks {_fallbacks(view.fallbacks)}   "
        f"AUC vs true P(click) {_num(view.served_auc, '.3f')} {_DIM}(random 0.5){_RESET}",
        f"{_BOLD}freshness{_RESET} median {_num(median, '.1f', ' s')}   "
        f"p95 {_num(p95, '.1f', ' s')}   max {_num(worst, '.1f', ' s')}   "
        f"{_DIM}(sample emitted -> first served snapshot trained on it; n={n_fresh:,}){_RESET}",
        "",
        "processes " + "   ".join(f"{name}: {state}" for name, state in view.children.items()),
    ]
    return _CLEAR + "\n".join(lines) + "\n"


def status_line(view: ViewData) -> str:
    """One ``key=value`` line of the frame (for logs when the view is off)."""
    pairs: list[tuple[str, str]] = [("elapsed_s", f"{view.elapsed_s:.0f}")]
    pairs += [(row.kind, str(row.total)) for row in view.topics]
    pairs += [
        ("learner_samples", _num(view.learner_samples, "d")),
        ("learner_lag", _num(view.learner_lag, "d")),
        ("version", _num(view.scorer_version, "d")),
        ("served", str(view.served_requests)),
        ("fallbacks", str(sum(view.fallbacks.values()))),
        ("served_auc", _num(view.served_auc, ".3f")),
        ("fresh_p50_s", _num(view.freshness[0], ".1f")),
        ("fresh_p95_s", _num(view.freshness[1], ".1f")),
    ]
    pairs += [(f"{r.task}_{r.metric.lower()}", _num(r.model, ".3f")) for r in _auc_rows(view)]
    pairs += [
        (f"{r.task}_{r.metric.lower()}_oracle", _num(r.oracle, ".3f")) for r in _auc_rows(view)
    ]
    return " ".join(f"{k}={v}" for k, v in pairs)


def _auc_rows(view: ViewData) -> Sequence[MetricRow]:
    return [r for r in view.metrics if r.metric == "AUC"]
