"""The demo's pure measurements: soft AUC, freshness, histogram quantiles."""

from __future__ import annotations

import math

import numpy as np
import pytest

from demo.metrics import (
    Swap,
    freshness_ms,
    grouped_soft_auc,
    histogram_quantile,
    parse_histogram,
    quantiles,
    soft_auc,
)
from learner.metrics import AUC
from serving.metrics import LATENCY_BUCKETS, ServingMetrics


def brute_soft_auc(scores: np.ndarray, p: np.ndarray) -> float:
    """The definition, pair by pair: p_i (1 - p_j) weighted wins, ties one half."""
    wins = pairs = 0.0
    for i in range(len(scores)):
        for j in range(len(scores)):
            if i == j:
                continue
            w = p[i] * (1 - p[j])
            pairs += w
            if scores[i] > scores[j]:
                wins += w
            elif scores[i] == scores[j]:
                wins += 0.5 * w
    return wins / pairs


@pytest.mark.parametrize("seed", range(5))
def test_soft_auc_matches_the_pairwise_definition_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, 40).astype(float)  # many ties
    p = rng.random(40)
    assert soft_auc(scores, p) == pytest.approx(brute_soft_auc(scores, p), abs=1e-12)


def test_soft_auc_with_hard_labels_is_the_ordinary_auc() -> None:
    rng = np.random.default_rng(7)
    labels = (rng.random(500) < 0.3).astype(float)
    scores = rng.random(500) + 0.3 * labels
    exact = AUC(n_bins=1 << 20)
    exact.update(labels, scores)
    assert soft_auc(scores, labels) == pytest.approx(exact.get(), abs=1e-4)


def test_soft_auc_orders_rankings_by_quality() -> None:
    rng = np.random.default_rng(3)
    p = rng.random(200)
    best = soft_auc(p, p)
    noisy = soft_auc(p + rng.normal(0, 0.3, 200), p)
    assert best > noisy > 0.5 > soft_auc(-p, p)
    assert soft_auc(-p, p) == pytest.approx(1 - best)


def test_soft_auc_edge_cases() -> None:
    assert math.isnan(soft_auc([], []))
    assert math.isnan(soft_auc([1.0, 2.0], [1.0, 1.0]))  # no negative weight at all
    with pytest.raises(ValueError, match="differ in length"):
        soft_auc([1.0], [0.5, 0.5])
    with pytest.raises(ValueError, match="within"):
        soft_auc([1.0, 2.0], [0.5, 1.5])


def test_grouped_soft_auc_only_compares_within_groups() -> None:
    # each request ranks its own candidates perfectly, but request 2's scores are all lower
    groups = [([10.0, 9.0], [1.0, 0.0]), ([2.0, 1.0], [1.0, 0.0])]
    assert grouped_soft_auc(groups) == 1.0
    pooled = soft_auc([10.0, 9.0, 2.0, 1.0], [1.0, 0.0, 1.0, 0.0])
    assert pooled < 1.0
    # pooling weights each group by its pairs, unlike a mean of per-group AUCs
    big = ([1.0, 2.0, 3.0, 4.0], [0.9, 0.6, 0.3, 0.1])  # worst possible order, many pairs
    small = ([2.0, 1.0], [0.9, 0.1])
    combined = grouped_soft_auc([big, small])
    mean = (soft_auc(*big) + soft_auc(*small)) / 2
    assert combined < mean


def test_freshness_uses_the_first_served_snapshot_that_covers_the_sample() -> None:
    swaps = [
        Swap(1, loaded_at_ms=10_000, trained_through_ms=8_000),
        Swap(3, loaded_at_ms=20_000, trained_through_ms=17_000),  # version 2 never served
        Swap(4, loaded_at_ms=26_000, trained_through_ms=25_000),
    ]
    emitted = [5_000, 8_000, 8_001, 17_000, 24_000, 25_001]
    fresh = freshness_ms(emitted, swaps)
    assert fresh[:5].tolist() == [5_000.0, 2_000.0, 11_999.0, 3_000.0, 2_000.0]
    assert math.isnan(fresh[5])  # no served snapshot trained on it yet


def test_freshness_follows_serving_order_and_tolerates_a_rollback() -> None:
    swaps = [
        Swap(5, loaded_at_ms=30_000, trained_through_ms=29_000),
        Swap(2, loaded_at_ms=40_000, trained_through_ms=12_000),  # rolled back to an old one
        Swap(6, loaded_at_ms=50_000, trained_through_ms=45_000),
    ]
    fresh = freshness_ms([20_000, 35_000], swaps)
    # 20_000 was covered by version 5 (served first); 35_000 only by version 6
    assert fresh.tolist() == [10_000.0, 15_000.0]
    assert math.isnan(freshness_ms([1], [Swap(1, 5, None)])[0])


def test_swap_parses_model_endpoint_entries() -> None:
    entry = {"version": 3, "loaded_at": 1000, "created_at": 900, "trained_through_ms": 800}
    assert Swap.from_dict(entry) == Swap(3, 1000, 800)
    assert Swap.from_dict({**entry, "trained_through_ms": None}).trained_through_ms is None


def test_quantiles_ignore_missing_values() -> None:
    assert quantiles([float("nan"), 4.0, 2.0, 3.0, 1.0], (0.5, 0.95, 1.0)) == pytest.approx(
        [2.5, 3.85, 4.0]
    )
    assert all(math.isnan(q) for q in quantiles([], (0.5,)))


def test_histogram_quantile_from_the_scorer_metrics_matches_the_observations() -> None:
    metrics = ServingMetrics()
    rng = np.random.default_rng(0)
    observed = rng.uniform(0.002, 0.010, 2000)
    for value in observed:
        metrics.latency.observe(float(value))
    body, _ = metrics.render()
    buckets, count = parse_histogram(body.decode(), "mtl_serve_request_seconds")
    assert count == 2000
    assert [le for le, _ in buckets] == [*LATENCY_BUCKETS, math.inf]
    for q in (0.5, 0.9, 0.99):
        # linear interpolation inside 1-2 ms buckets: within one bucket width of the truth
        assert histogram_quantile(q, buckets) == pytest.approx(np.quantile(observed, q), abs=2e-3)


def test_histogram_quantile_edges() -> None:
    assert math.isnan(histogram_quantile(0.5, []))
    assert math.isnan(histogram_quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]))
    # everything above the last finite bound: that bound is the best estimate
    assert histogram_quantile(0.99, [(1.0, 0.0), (2.0, 0.0), (math.inf, 5.0)]) == 2.0
    with pytest.raises(ValueError):
        histogram_quantile(1.5, [(1.0, 1.0)])
