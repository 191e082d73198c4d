"""Progressive validation: streaming per-task metrics, cumulative and over a rolling window.

Like River's metrics, each metric has ``update`` / ``revert`` / ``get``, so a rolling window is
one more instance that reverts the oldest batch it holds. Metrics take whole batches (numpy
arrays) because the learner scores a micro-batch at a time, *before* training on it.

- :class:`AUC`: a fixed-bin histogram of predicted probabilities per class, so update and
  revert are O(batch) and the value is exact up to ties inside one bin (``n_bins`` = 4096 puts
  the error below 1e-3 for any realistic score distribution; the unit tests compare it with an
  exact pairwise AUC).
- :class:`LogLoss`, :class:`Calibration` (mean prediction / mean label), :class:`MSE`.

Examples
--------
>>> import numpy as np
>>> auc = AUC(n_bins=4)
>>> auc.update(np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.3, 0.6]))
>>> auc.get()
1.0
>>> auc.revert(np.array([0, 1]), np.array([0.1, 0.9]))
>>> auc.get()
1.0
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Mapping
from typing import Final

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "AUC",
    "MSE",
    "Calibration",
    "LogLoss",
    "Metric",
    "ProgressiveValidation",
    "Rolling",
    "format_metrics",
]

FloatArray = NDArray[np.float64]
_EPS: Final = 1e-7  # probability clip of the log loss: a 0 or 1 prediction costs ~16, not inf
_NAN: Final = float("nan")


def _f64(a: NDArray[np.generic]) -> FloatArray:
    return np.asarray(a, dtype=np.float64).reshape(-1)


class Metric(ABC):
    """A streaming metric over batches: ``update``/``revert`` (y_true, y_pred), then ``get``."""

    @abstractmethod
    def update(self, y_true: NDArray[np.generic], y_pred: NDArray[np.generic]) -> None:
        """Add a batch of labels and predictions (both (N,))."""

    @abstractmethod
    def revert(self, y_true: NDArray[np.generic], y_pred: NDArray[np.generic]) -> None:
        """Remove a batch previously added with ``update``."""

    @abstractmethod
    def get(self) -> float:
        """Return the current value (NaN while undefined, e.g. before any sample)."""

    @abstractmethod
    def state(self) -> FloatArray:
        """Return the sufficient statistics as one float64 array (for checkpoints)."""

    @abstractmethod
    def load_state(self, state: FloatArray) -> None:
        """Restore ``state()`` output."""


class _Sums(Metric):
    """Metrics that are a function of a few running sums: ``_terms`` gives them per batch."""

    n_terms = 2

    def __init__(self) -> None:
        self._sums = np.zeros(self.n_terms, dtype=np.float64)

    @abstractmethod
    def _terms(self, y: FloatArray, p: FloatArray) -> FloatArray: ...

    def update(self, y_true: NDArray[np.generic], y_pred: NDArray[np.generic]) -> None:
        self._sums += self._terms(_f64(y_true), _f64(y_pred))

    def revert(self, y_true: NDArray[np.generic], y_pred: NDArray[np.generic]) -> None:
        self._sums -= self._terms(_f64(y_true), _f64(y_pred))

    def state(self) -> FloatArray:
        return self._sums.copy()

    def load_state(self, state: FloatArray) -> None:
        if state.shape != self._sums.shape:
            raise ValueError(f"{type(self).__name__} state has shape {state.shape}")
        self._sums = state.astype(np.float64)


class LogLoss(_Sums):
    """Mean binary cross-entropy of probabilities, clipped to [1e-7, 1 - 1e-7]."""

    def _terms(self, y: FloatArray, p: FloatArray) -> FloatArray:
        p = np.clip(p, _EPS, 1.0 - _EPS)
        loss = -(y * np.log(p) + (1.0 - y) * np.log1p(-p))
        return np.array([loss.sum(), y.shape[0]])

    def get(self) -> float:
        total, n = self._sums
        return float(total / n) if n > 0.5 else _NAN


class Calibration(_Sums):
    """Mean prediction / mean label (1 is calibrated; NaN while no positive label was seen)."""

    def _terms(self, y: FloatArray, p: FloatArray) -> FloatArray:
        return np.array([p.sum(), y.sum()])

    def get(self) -> float:
        pred, label = self._sums
        return float(pred / label) if label > 0 else _NAN


class MSE(_Sums):
    """Mean squared error, optionally on log1p of labels and predictions (counts)."""

    def __init__(self, log1p: bool = False) -> None:
        super().__init__()
        self.log1p = log1p

    def _terms(self, y: FloatArray, p: FloatArray) -> FloatArray:
        if self.log1p:
            y, p = np.log1p(np.maximum(y, 0.0)), np.log1p(np.maximum(p, 0.0))
        return np.array([np.square(y - p).sum(), y.shape[0]])

    def get(self) -> float:
        total, n = self._sums
        return float(total / n) if n > 0.5 else _NAN


class AUC(Metric):
    """ROC AUC from per-class histograms of predicted probabilities over `n_bins` bins.

    Pairs in the same bin count one half, as exact ties do; labels > 0.5 are positives.
    """

    def __init__(self, n_bins: int = 4096) -> None:
        if n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        self.n_bins = n_bins
        self._pos = np.zeros(n_bins, dtype=np.float64)
        self._neg = np.zeros(n_bins, dtype=np.float64)

    def _hist(self, y_true: NDArray[np.generic], y_pred: NDArray[np.generic]) -> FloatArray:
        p = np.nan_to_num(_f64(y_pred), nan=0.0)
        idx = np.clip((p * self.n_bins).astype(np.int64), 0, self.n_bins - 1)  # (N,)
        pos = _f64(y_true) > 0.5  # (N,)
        return np.stack(
            [
                np.bincount(idx[pos], minlength=self.n_bins),
                np.bincount(idx[~pos], minlength=self.n_bins),
            ]
        ).astype(np.float64)  # (2, n_bins)

    def update(self, y_true: NDArray[np.generic], y_pred: NDArray[np.generic]) -> None:
        pos, neg = self._hist(y_true, y_pred)
        self._pos += pos
        self._neg += neg

    def revert(self, y_true: NDArray[np.generic], y_pred: NDArray[np.generic]) -> None:
        pos, neg = self._hist(y_true, y_pred)
        self._pos -= pos
        self._neg -= neg

    def get(self) -> float:
        n_pos, n_neg = self._pos.sum(), self._neg.sum()
        if n_pos < 0.5 or n_neg < 0.5:
            return _NAN
        neg_below = np.cumsum(self._neg) - self._neg  # negatives in strictly lower bins
        wins = (self._pos * (neg_below + 0.5 * self._neg)).sum()
        return float(wins / (n_pos * n_neg))

    def state(self) -> FloatArray:
        return np.concatenate([self._pos, self._neg])

    def load_state(self, state: FloatArray) -> None:
        if state.shape != (2 * self.n_bins,):
            raise ValueError(f"AUC state has shape {state.shape}, expected ({2 * self.n_bins},)")
        self._pos = state[: self.n_bins].astype(np.float64)
        self._neg = state[self.n_bins :].astype(np.float64)


class Rolling(Metric):
    """A metric over the most recent batches holding at least `window` samples.

    The oldest batch is reverted as soon as the ones after it hold `window` samples, so the
    window covers between `window` and `window` + one batch samples.
    """

    def __init__(self, metric: Metric, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.metric = metric
        self.window = window
        self._batches: deque[tuple[FloatArray, FloatArray]] = deque()
        self._size = 0

    def update(self, y_true: NDArray[np.generic], y_pred: NDArray[np.generic]) -> None:
        y, p = _f64(y_true).copy(), _f64(y_pred).copy()
        self.metric.update(y, p)
        self._batches.append((y, p))
        self._size += y.shape[0]
        while self._batches and self._size - self._batches[0][0].shape[0] >= self.window:
            old_y, old_p = self._batches.popleft()
            self.metric.revert(old_y, old_p)
            self._size -= old_y.shape[0]

    def revert(self, y_true: NDArray[np.generic], y_pred: NDArray[np.generic]) -> None:
        raise NotImplementedError("a rolling window reverts its own oldest batches")

    def get(self) -> float:
        return self.metric.get()

    def state(self) -> FloatArray:
        # A window is recent context, not history worth persisting: it restarts empty.
        return np.zeros(0)

    def load_state(self, state: FloatArray) -> None:
        """Windows restart empty after a restore."""


MetricFactory = Callable[[], Metric]


def _factories(kind: str, auc_bins: int) -> dict[str, MetricFactory]:
    if kind == "binary":
        return {
            "auc": lambda: AUC(auc_bins),
            "logloss": LogLoss,
            "calibration": Calibration,
        }
    if kind == "count":
        return {"mse": MSE, "mse_log1p": lambda: MSE(log1p=True), "calibration": Calibration}
    return {"mse": MSE}


class ProgressiveValidation:
    """Per-task metrics over each task's sample space, cumulative and windowed.

    ``get()`` returns a flat dict: ``"{task}.{metric}"`` (cumulative), ``"{task}.{metric}_w"``
    (rolling window of `window` samples) and ``"{task}.n"`` (samples scored in the task's space).

    Examples
    --------
    >>> import numpy as np
    >>> pv = ProgressiveValidation({"ctr": "binary"}, window=2)
    >>> ones = np.ones(3)
    >>> pv.update({"ctr": np.array([0.2, 0.8, 0.6])}, {"ctr": np.array([0, 1, 0])}, {"ctr": ones})
    >>> pv.get()["ctr.auc"], pv.get()["ctr.n"]
    (1.0, 3.0)
    """

    def __init__(self, task_kinds: Mapping[str, str], window: int = 100_000, auc_bins: int = 4096):
        self.task_kinds = dict(task_kinds)
        self.window = window
        self.cumulative: dict[str, dict[str, Metric]] = {}
        self.windowed: dict[str, dict[str, Metric]] = {}
        self.counts: dict[str, float] = dict.fromkeys(self.task_kinds, 0.0)
        for task, kind in self.task_kinds.items():
            made = _factories(kind, auc_bins)
            self.cumulative[task] = {name: make() for name, make in made.items()}
            self.windowed[task] = {name: Rolling(make(), window) for name, make in made.items()}

    def update(
        self,
        preds: Mapping[str, NDArray[np.generic]],
        labels: Mapping[str, NDArray[np.generic]],
        masks: Mapping[str, NDArray[np.generic]],
    ) -> None:
        """Score one batch: per task, the rows in its sample space (mask > 0)."""
        for task in self.task_kinds:
            inside = _f64(masks[task]) > 0  # (N,)
            if not inside.any():
                continue
            y, p = _f64(labels[task])[inside], _f64(preds[task])[inside]
            self.counts[task] += float(y.shape[0])
            for metric in self.cumulative[task].values():
                metric.update(y, p)
            for metric in self.windowed[task].values():
                metric.update(y, p)

    def get(self) -> dict[str, float]:
        """Return every metric's current value (NaN where undefined)."""
        out: dict[str, float] = {}
        for task in self.task_kinds:
            out[f"{task}.n"] = self.counts[task]
            for name, metric in self.cumulative[task].items():
                out[f"{task}.{name}"] = metric.get()
            for name, metric in self.windowed[task].items():
                out[f"{task}.{name}_w"] = metric.get()
        return out

    def state_dict(self) -> dict[str, FloatArray]:
        """Return the cumulative statistics as named float64 arrays (windows restart empty)."""
        state = {f"{t}.n": np.array([n]) for t, n in self.counts.items()}
        for task, metrics in self.cumulative.items():
            state.update({f"{task}.{name}": m.state() for name, m in metrics.items()})
        return state

    def load_state_dict(self, state: Mapping[str, FloatArray]) -> None:
        """Restore `state_dict()` output; tasks or metrics it lacks keep their fresh state."""
        for task in self.task_kinds:
            if f"{task}.n" in state:
                self.counts[task] = float(state[f"{task}.n"][0])
            for name, metric in self.cumulative[task].items():
                key = f"{task}.{name}"
                if key in state:
                    metric.load_state(np.asarray(state[key], dtype=np.float64))


def format_metrics(metrics: Mapping[str, float], names: tuple[str, ...] = ("auc_w",)) -> str:
    """Return ``task.metric=value`` pairs for a log line (4 significant digits)."""
    parts = []
    for key, value in metrics.items():
        if key.rpartition(".")[2] in names:
            parts.append(f"{key}={'nan' if math.isnan(value) else f'{value:.4g}'}")
    return " ".join(parts)
