"""Offline metrics: AUC for binary tasks, MSE for the others, and AUC against true probabilities.

Every task is scored over its own sample space (its mask), like the learner's losses and its
progressive validation.

Examples
--------
>>> y = np.array([0.0, 1.0, 1.0, 0.0])
>>> auc(y, np.array([0.1, 0.8, 0.7, 0.2]))
1.0
>>> round(truth_auc(np.array([0.2, 0.9]), np.array([0.2, 0.9])), 4)
0.8535
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from numpy.typing import NDArray

from evaluation.datasets import Split, metric_of

__all__ = ["auc", "selection_score", "task_metrics", "truth_auc", "truth_metrics"]

Array = NDArray[np.float64]


def auc(
    labels: NDArray[np.floating], scores: NDArray[np.floating], weights: Array | None = None
) -> float:
    """Return the ROC AUC, or NaN when only one class is present (it is undefined then)."""
    from sklearn.metrics import roc_auc_score  # sklearn's import is slow: pay it when scoring

    y = np.asarray(labels) > 0.5
    w = None if weights is None else np.asarray(weights)
    positive = y.sum() if w is None else w[y].sum()
    negative = (~y).sum() if w is None else w[~y].sum()
    if positive <= 0 or negative <= 0:
        return math.nan
    return float(roc_auc_score(y, scores, sample_weight=w))


def truth_auc(scores: NDArray[np.floating], probs: NDArray[np.floating]) -> float:
    """Return the expected AUC of `scores` against labels drawn from the true `probs`.

    Every row counts as a positive with weight p and as a negative with weight 1 - p: the
    AUC over all label draws, up to the pairs of a row with itself (a 1/N effect). It scores
    a model over *all* rows, also those whose label was never observed (ESMM's point).
    """
    p = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)  # (N,)
    s = np.asarray(scores, dtype=np.float64)  # (N,)
    labels = np.concatenate([np.ones_like(p), np.zeros_like(p)])  # (2N,)
    return auc(labels, np.concatenate([s, s]), np.concatenate([p, 1.0 - p]))


def task_metrics(
    tasks: Mapping[str, str], preds: Mapping[str, NDArray[np.floating]], split: Split
) -> dict[str, float]:
    """Return ``{"{task}.auc" | "{task}.mse": value}`` over each task's sample space."""
    out: dict[str, float] = {}
    for task, kind in tasks.items():
        rows = split.in_space(task)
        y, p = split.labels[task][rows], np.asarray(preds[task])[rows]
        if metric_of(kind) == "auc":
            out[f"{task}.auc"] = auc(y, p)
        else:
            out[f"{task}.mse"] = float(np.mean(np.square(p - y))) if rows.any() else math.nan
    return out


def selection_score(
    tasks: Mapping[str, str], preds: Mapping[str, NDArray[np.floating]], split: Split
) -> float:
    """Return one higher-is-better number for model selection on the validation split.

    The mean over tasks of the AUC (binary) or 1 - MSE / Var(y) (regression and count), so
    that tasks on different scales weigh alike. NaN metrics are left out.
    """
    metrics = task_metrics(tasks, preds, split)
    scores = []
    for task, kind in tasks.items():
        value = metrics[f"{task}.{metric_of(kind)}"]
        if metric_of(kind) == "mse":
            y = split.labels[task][split.in_space(task)]
            value = 1.0 - value / max(float(np.var(y)), 1e-12)
        if not math.isnan(value):
            scores.append(value)
    return float(np.mean(scores)) if scores else math.nan


def truth_metrics(preds: Mapping[str, NDArray[np.floating]], split: Split) -> dict[str, float]:
    """Return oracle metrics over *all* rows for every task with true probabilities.

    ``{task}.auc_true``: `truth_auc` against the true probabilities; ``{task}.mse_true``: mean
    squared gap to them; ``{task}.bias``: mean prediction minus mean true probability.
    """
    out: dict[str, float] = {}
    for task, probs in split.truth.items():
        if task not in preds:
            continue
        p = np.asarray(preds[task], dtype=np.float64)  # (N,)
        out[f"{task}.auc_true"] = truth_auc(p, probs)
        out[f"{task}.mse_true"] = float(np.mean(np.square(p - probs)))
        out[f"{task}.bias"] = float(p.mean() - probs.mean())
    return out
