"""Progressive-validation metrics against naive reference computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.typing import NDArray

from learner.metrics import (
    AUC,
    MSE,
    Calibration,
    LogLoss,
    ProgressiveValidation,
    Rolling,
    format_metrics,
)

FloatArray = NDArray[np.float64]


def exact_auc(y: FloatArray, p: FloatArray) -> float:
    """Naive pairwise ROC AUC: P(score of a positive > score of a negative), ties count 1/2."""
    pos, neg = p[y > 0.5], p[y <= 0.5]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def _data(n: int, seed: int) -> tuple[FloatArray, FloatArray]:
    rng = np.random.default_rng(seed)
    score = rng.normal(size=n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(score * 1.5 - 1.0)))).astype(np.float64)
    p = 1 / (1 + np.exp(-(score + rng.normal(scale=0.8, size=n))))
    return y, p


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_histogram_auc_matches_exact_auc(seed: int) -> None:
    y, p = _data(3000, seed)
    auc = AUC(n_bins=4096)
    for chunk in np.array_split(np.arange(len(y)), 7):
        auc.update(y[chunk], p[chunk])
    assert auc.get() == pytest.approx(exact_auc(y, p), abs=1e-3)


def test_histogram_auc_is_exact_when_scores_sit_on_the_bin_grid() -> None:
    # every score is the left edge of a bin, so ties in a bin are exactly ties in the scores
    rng = np.random.default_rng(3)
    p = rng.integers(0, 16, size=500) / 16
    y = (rng.random(500) < p).astype(np.float64)
    auc = AUC(n_bins=16)
    auc.update(y, p)
    assert auc.get() == pytest.approx(exact_auc(y, p), abs=1e-12)


def test_auc_is_nan_with_a_single_class_and_reverts() -> None:
    auc = AUC(n_bins=64)
    auc.update(np.zeros(5), np.linspace(0, 1, 5))
    assert math.isnan(auc.get())
    y, p = _data(400, 4)
    auc.update(y, p)
    auc.revert(np.zeros(5), np.linspace(0, 1, 5))
    fresh = AUC(n_bins=64)
    fresh.update(y, p)
    assert auc.get() == fresh.get()


def test_logloss_calibration_and_mse_match_numpy() -> None:
    y, p = _data(1000, 5)
    clipped = np.clip(p, 1e-7, 1 - 1e-7)
    expected_ll = float(-np.mean(y * np.log(clipped) + (1 - y) * np.log(1 - clipped)))
    counts = np.random.default_rng(6).poisson(1.5, size=1000).astype(np.float64)
    pred_counts = counts + np.random.default_rng(7).normal(size=1000)
    metrics = [
        (LogLoss(), y, p, expected_ll),
        (Calibration(), y, p, float(p.mean() / y.mean())),
        (MSE(), counts, pred_counts, float(np.mean((counts - pred_counts) ** 2))),
        (
            MSE(log1p=True),
            counts,
            pred_counts,
            float(np.mean((np.log1p(counts) - np.log1p(np.maximum(pred_counts, 0))) ** 2)),
        ),
    ]
    for metric, labels, preds, expected in metrics:
        metric.update(labels[:400], preds[:400])
        metric.update(labels[400:], preds[400:])
        assert metric.get() == pytest.approx(expected, rel=1e-9)
        metric.revert(labels[400:], preds[400:])
        head = type(metric)() if not isinstance(metric, MSE) else MSE(metric.log1p)
        head.update(labels[:400], preds[:400])
        assert metric.get() == pytest.approx(head.get(), rel=1e-9)


def test_undefined_metrics_are_nan() -> None:
    assert math.isnan(LogLoss().get())
    assert math.isnan(MSE().get())
    calibration = Calibration()
    calibration.update(np.zeros(3), np.full(3, 0.2))
    assert math.isnan(calibration.get())


def test_rolling_window_equals_the_metric_over_the_last_batches() -> None:
    y, p = _data(1000, 8)
    batches = np.array_split(np.arange(1000), 10)  # 100 rows each
    rolling = Rolling(AUC(n_bins=1024), window=250)
    for i, rows in enumerate(batches):
        rolling.update(y[rows], p[rows])
        # the newest batches holding >= 250 rows: 3 batches of 100 once there are enough
        start = max(0, i - 2)
        tail = np.concatenate(batches[start : i + 1])
        reference = AUC(n_bins=1024)
        reference.update(y[tail], p[tail])
        assert rolling.get() == pytest.approx(reference.get(), abs=1e-12)


def test_rolling_keeps_at_least_one_batch_larger_than_the_window() -> None:
    rolling = Rolling(LogLoss(), window=10)
    rolling.update(np.ones(50), np.full(50, 0.5))
    assert rolling.get() == pytest.approx(math.log(2))
    with pytest.raises(NotImplementedError):
        rolling.revert(np.ones(1), np.ones(1))


def _pv_batch(seed: int, n: int = 200) -> tuple[dict[str, FloatArray], ...]:
    rng = np.random.default_rng(seed)
    click = (rng.random(n) < 0.3).astype(np.float64)
    conv = click * (rng.random(n) < 0.5)
    ysl = conv * rng.poisson(2.0, n)
    preds = {
        "ctr": rng.random(n),
        "cvr": rng.random(n),
        "ctcvr": rng.random(n),
        "ysl": rng.random(n) * 3,
    }
    labels = {"ctr": click, "cvr": conv, "ctcvr": click * conv, "ysl": ysl}
    ones = np.ones(n)
    masks = {"ctr": ones, "cvr": click, "ctcvr": ones, "ysl": click}
    return preds, labels, masks


KINDS = {"ctr": "binary", "cvr": "binary", "ctcvr": "binary", "ysl": "count"}


def test_progressive_validation_scores_each_task_over_its_mask_only() -> None:
    preds, labels, masks = _pv_batch(9)
    pv = ProgressiveValidation(KINDS, window=1000)
    pv.update(preds, labels, masks)
    got = pv.get()
    clicked = masks["cvr"] > 0
    assert got["cvr.n"] == clicked.sum()
    assert got["cvr.auc"] == pytest.approx(
        exact_auc(labels["cvr"][clicked], preds["cvr"][clicked]), abs=1e-3
    )
    # garbage outside a task's sample space changes nothing
    noisy = {k: v.copy() for k, v in preds.items()}
    noisy["cvr"][~clicked] = 1.0 - noisy["cvr"][~clicked]
    noisy["ysl"][~clicked] = 1e6
    other = ProgressiveValidation(KINDS, window=1000)
    other.update(noisy, labels, masks)
    assert other.get() == pytest.approx(got, nan_ok=True)
    assert {
        "ctr.auc",
        "ctr.auc_w",
        "ctr.logloss",
        "ctr.calibration",
        "ysl.mse",
        "ysl.mse_w",
    } <= set(got)


def test_progressive_validation_state_round_trip_restores_cumulative_metrics() -> None:
    pv = ProgressiveValidation(KINDS, window=150)
    for seed in range(3):
        pv.update(*_pv_batch(seed))
    restored = ProgressiveValidation(KINDS, window=150)
    restored.load_state_dict(pv.state_dict())
    cumulative = {k: v for k, v in pv.get().items() if not k.endswith("_w")}
    assert {k: v for k, v in restored.get().items() if not k.endswith("_w")} == pytest.approx(
        cumulative, nan_ok=True
    )
    # windows restart empty; the next batch fills them again
    assert math.isnan(restored.get()["ctr.auc_w"])
    batch = _pv_batch(10)
    pv.update(*batch)
    restored.update(*batch)
    assert restored.get()["ctr.auc"] == pytest.approx(pv.get()["ctr.auc"])


def test_format_metrics_picks_the_named_metrics() -> None:
    line = format_metrics({"ctr.auc_w": 0.71234, "ctr.auc": 0.7, "ysl.mse_w": float("nan")})
    assert line == "ctr.auc_w=0.7123"
    assert "ysl.mse_w=nan" in format_metrics({"ysl.mse_w": float("nan")}, ("mse_w",))
