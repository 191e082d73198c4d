"""Pure measurements of the demo: ranking quality against the oracle, freshness, latency.

- :func:`soft_auc` is the ROC AUC of scores against *probabilities*: each item counts as a
  positive with weight ``p`` and as a negative with weight ``1 - p`` (pairs of an item with
  itself excluded, ties count one half). With 0/1 labels it is the ordinary AUC. It answers
  "for two candidates, how often is the one ranked higher the one that gets clicked", without
  waiting for clicks, from the simulator's true click probabilities.
- :func:`grouped_soft_auc` pools the pairs *within* groups (requests): a ranking is only ever
  compared between candidates of the same request.
- :func:`freshness_ms`: for a sample emitted at wall time T, the first snapshot *served* with
  ``trained_through_ms >= T``; freshness = when the scorer started serving it - T.
- :func:`histogram_quantile` reads a quantile off Prometheus bucket counts (as PromQL does).

Examples
--------
>>> soft_auc([0.9, 0.1], [1.0, 0.0]), soft_auc([0.1, 0.9], [1.0, 0.0])
(1.0, 0.0)
>>> round(soft_auc([3.0, 2.0, 1.0], [0.8, 0.5, 0.1]), 3)
0.902
>>> swaps = [Swap(1, loaded_at_ms=2_000, trained_through_ms=1_500)]
>>> freshness_ms([1_000, 1_800], swaps).tolist()
[1000.0, nan]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "AucParts",
    "Swap",
    "freshness_ms",
    "grouped_soft_auc",
    "histogram_quantile",
    "parse_histogram",
    "quantiles",
    "soft_auc",
    "soft_auc_parts",
]

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class AucParts:
    """Weighted pair counts of a soft AUC: ``wins / pairs`` is the AUC."""

    wins: float  # sum over ordered pairs (i, j), i != j, of p_i (1 - p_j) [s_i > s_j] (+1/2 ties)
    pairs: float  # sum over the same pairs of p_i (1 - p_j)

    def __add__(self, other: AucParts) -> AucParts:
        return AucParts(self.wins + other.wins, self.pairs + other.pairs)

    @property
    def auc(self) -> float:
        """The AUC, NaN without a single weighted pair."""
        return self.wins / self.pairs if self.pairs > 0 else math.nan


def soft_auc_parts(scores: ArrayLike, p: ArrayLike) -> AucParts:
    """Wins and pairs of the soft AUC of ``scores`` against probabilities ``p`` (O(n log n))."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)  # (N,)
    pos = np.asarray(p, dtype=np.float64).reshape(-1)  # (N,)
    if s.shape != pos.shape:
        raise ValueError(f"scores and p differ in length: {s.shape[0]} != {pos.shape[0]}")
    if s.size == 0:
        return AucParts(0.0, 0.0)
    if np.any(~np.isfinite(s)) or np.any((pos < 0) | (pos > 1) | ~np.isfinite(pos)):
        raise ValueError("scores must be finite and p within [0, 1]")
    neg = 1.0 - pos  # (N,)
    _, group = np.unique(s, return_inverse=True)  # tie groups, in ascending score order
    group_neg = np.bincount(group, weights=neg)  # (G,) negative weight per distinct score
    below = np.cumsum(group_neg) - group_neg  # (G,) negative weight strictly below
    # an item beats the negatives below it and ties half with the others of its group
    wins = float(np.sum(pos * (below[group] + 0.5 * (group_neg[group] - neg))))
    pairs = float(pos.sum() * neg.sum() - np.sum(pos * neg))
    return AucParts(wins, pairs)


def soft_auc(scores: ArrayLike, p: ArrayLike) -> float:
    """Soft-label ROC AUC of ``scores`` against probabilities ``p`` (NaN when undefined)."""
    return soft_auc_parts(scores, p).auc


def grouped_soft_auc(groups: Iterable[tuple[ArrayLike, ArrayLike]]) -> float:
    """Soft AUC over pairs within each ``(scores, p)`` group (a request), pooled.

    Examples
    --------
    >>> grouped_soft_auc([([2.0, 1.0], [1.0, 0.0]), ([5.0, 9.0], [1.0, 0.0])])
    0.5
    """
    total = AucParts(0.0, 0.0)
    for scores, p in groups:
        total = total + soft_auc_parts(scores, p)
    return total.auc


@dataclass(frozen=True)
class Swap:
    """A snapshot version as the scorer served it."""

    version: int
    loaded_at_ms: int  # when the scorer started serving it, epoch ms
    trained_through_ms: int | None  # max emitted_at of the samples it was trained on

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Swap:
        """Parse one entry of ``GET /v1/model``'s ``swaps``."""
        trained = data.get("trained_through_ms")
        return cls(
            int(data["version"]),
            int(data["loaded_at"]),
            int(trained) if isinstance(trained, int | float) else None,
        )


def freshness_ms(emitted_ms: ArrayLike, swaps: Sequence[Swap]) -> FloatArray:
    """Freshness of each sample emitted at ``emitted_ms`` (wall, epoch ms): NaN until served.

    The first served snapshot trained on a sample is the first one, in serving order, whose
    ``trained_through_ms`` reaches the sample's emission time.
    """
    emitted = np.asarray(emitted_ms, dtype=np.float64).reshape(-1)  # (N,)
    live = sorted((s for s in swaps if s.trained_through_ms is not None), key=_served_order)
    if not live:
        return np.full(emitted.shape, np.nan)
    loaded = np.array([s.loaded_at_ms for s in live], dtype=np.float64)  # (V,)
    # running max: once a snapshot covered T, every later one did (a rollback cannot un-serve)
    covered = np.maximum.accumulate(
        np.array([s.trained_through_ms for s in live], dtype=np.float64)
    )  # (V,)
    first = np.searchsorted(covered, emitted, side="left")  # (N,) index of the first cover
    out = np.full(emitted.shape, np.nan)
    served = first < len(live)
    out[served] = loaded[first[served]] - emitted[served]
    return out


def _served_order(swap: Swap) -> tuple[int, int]:
    return swap.loaded_at_ms, swap.version


def quantiles(values: ArrayLike, qs: Sequence[float] = (0.5, 0.95, 1.0)) -> list[float]:
    """Quantiles of the finite ``values`` (NaN each when there are none).

    Examples
    --------
    >>> quantiles([1.0, 2.0, 3.0, float("nan")], (0.5, 1.0))
    [2.0, 3.0]
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return [math.nan for _ in qs]
    return [float(x) for x in np.quantile(v, list(qs))]


def parse_histogram(text: str, name: str) -> tuple[list[tuple[float, float]], float]:
    """Cumulative buckets ``[(le, count), ...]`` and ``_count`` of histogram ``name``.

    Reads Prometheus text exposition (the scorer's ``/metrics``); a histogram with labels is
    summed over them.

    Examples
    --------
    >>> text = 'h_bucket{le="0.1"} 3\\nh_bucket{le="+Inf"} 4\\nh_count 4\\nh_sum 0.9\\n'
    >>> parse_histogram(text, "h")
    ([(0.1, 3.0), (inf, 4.0)], 4.0)
    """
    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[float, float] = {}
    count = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:  # matched by sample name: typed or untyped exposition
            if sample.name == f"{name}_bucket":
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + float(sample.value)
            elif sample.name == f"{name}_count":
                count += float(sample.value)
    return sorted(buckets.items()), count


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """The ``q`` quantile of cumulative ``(le, count)`` buckets, linear within a bucket.

    NaN without observations; the highest finite bound when the quantile falls in ``+Inf``.

    Examples
    --------
    >>> histogram_quantile(0.5, [(0.001, 0.0), (0.002, 10.0), (float("inf"), 10.0)])
    0.0015
    """
    if not 0 <= q <= 1:
        raise ValueError(f"q must be within [0, 1], got {q}")
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank and count > below:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = (le if not math.isinf(le) else lower), count
    return lower
