"""Evaluation data sets from the real installed files: counts, alignment, leakage, splits."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.census import CATEGORICAL, DENSE, load_census, read_census
from evaluation.datasets import Dataset, reindex, split_indices
from evaluation.movielens import load_movielens
from evaluation.synthetic import load_synthetic
from evaluation.world import load_world


@pytest.fixture(scope="module")
def census1() -> Dataset:
    return load_census(1, seed=0)


def test_census_files_have_the_documented_rows_and_columns() -> None:
    table = read_census()
    assert table.n_train == 199_523
    assert table.codes.shape == (199_523 + 99_762, 42)


def test_census_columns_are_aligned() -> None:
    table = read_census()
    age = table.numeric("age")
    assert age.min() == 0 and age.max() == 90
    assert set(table.values("sex")) == {"Female", "Male"}
    assert set(table.values("year")) == {"94", "95"}
    assert set(table.values("income_50k")) == {"- 50000.", "50000+."}
    assert "Never married" in set(table.values("marital_stat"))
    assert "Bachelors degree(BA AB BS)" in set(table.values("education"))
    assert table.numeric("weeks_worked").max() == 52
    assert (table.numeric("instance_weight") > 0).all()


def test_census_label_rates_are_plausible() -> None:
    group1, group2 = load_census(1, seed=0), load_census(2, seed=0)
    rates = {t: float(y.mean()) for t, y in group1.train.labels.items()}
    rates["education"] = float(group2.train.labels["education"].mean())
    assert 0.05 < rates["income"] < 0.08  # 6.2% earn more than 50K
    assert 0.40 < rates["marital"] < 0.47  # 43% never married
    assert 0.15 < rates["education"] < 0.25  # associate degree or higher
    assert group1.tasks == {"income": "binary", "marital": "binary"}
    assert group2.tasks == {"education": "binary", "marital": "binary"}


# spelled out, not imported: the test must not trust the loader's own list
NOT_FEATURES = ("income_50k", "marital_stat", "education", "instance_weight")


def test_census_features_hold_no_label_column(census1: Dataset) -> None:
    names = [f.name for f in census1.spec.categorical] + census1.spec.dense
    assert set(names).isdisjoint(NOT_FEATURES)
    assert names == [*CATEGORICAL, *DENSE]
    assert len(names) == 42 - len(NOT_FEATURES)
    # and no feature column is a re-coded copy of a label column or the instance weight
    table = read_census()
    train_rows = np.arange(table.n_train, dtype=np.int64)
    for column in NOT_FEATURES:
        codes, _ = reindex(table.column(column), train_rows)
        copies = [
            f.name
            for j, f in enumerate(census1.spec.categorical)
            if np.array_equal(census1.train.cat[:, j], codes[: table.n_train])
        ]
        assert not copies, f"{column} leaks as {copies}"


def test_census_test_file_is_halved_by_seed(census1: Dataset) -> None:
    assert (len(census1.train), len(census1.valid), len(census1.test)) == (199_523, 49_881, 49_881)
    again, other = load_census(1, seed=0), load_census(1, seed=1)
    np.testing.assert_array_equal(again.test.cat, census1.test.cat)
    np.testing.assert_array_equal(again.valid.labels["income"], census1.valid.labels["income"])
    assert not np.array_equal(other.test.cat, census1.test.cat)
    # validation and test partition the test file: the label counts add up for every seed
    for data in (census1, other):
        positives = data.valid.labels["income"].sum() + data.test.labels["income"].sum()
        assert positives == 6_186


def test_census_dense_is_finite_and_money_is_log_scaled(census1: Dataset) -> None:
    assert np.isfinite(census1.train.dense).all()
    gains = census1.train.dense[:, DENSE.index("capital_gains")]
    assert gains.min() >= 0.0 and gains.max() < np.log1p(100_000) + 1e-3


def test_movielens_loads_with_both_tasks_and_splits_by_seed() -> None:
    data = load_movielens(seed=0)
    assert (len(data.train), len(data.valid), len(data.test)) == (80_000, 10_000, 10_000)
    assert data.tasks == {"rating": "regression", "like": "binary"}
    ratings = np.concatenate([s.labels["rating"] for s in (data.train, data.valid, data.test)])
    assert set(np.unique(ratings)) == {1.0, 2.0, 3.0, 4.0, 5.0}
    np.testing.assert_array_equal(data.train.labels["like"], data.train.labels["rating"] >= 4)
    assert 0.5 < data.train.labels["like"].mean() < 0.6
    buckets = {f.name: f.buckets for f in data.spec.categorical}
    assert buckets["user_id"] <= 944 and buckets["item_id"] <= 1683 and buckets["gender"] == 3
    again, other = load_movielens(seed=0), load_movielens(seed=1)
    np.testing.assert_array_equal(again.test.labels["rating"], data.test.labels["rating"])
    assert not np.array_equal(other.test.cat, data.test.cat)


def test_synthetic_correlation_controls_how_related_the_labels_are() -> None:
    def label_corr(p: float) -> float:
        y = load_synthetic(p, seed=0, n_train=4000, n_eval=10, dim=8).train.labels
        return float(np.corrcoef(y["y1"], y["y2"])[0, 1])

    assert label_corr(1.0) > 0.9
    assert abs(label_corr(0.0)) < 0.2
    data = load_synthetic(0.5, seed=0, n_train=50, n_eval=7, dim=4)
    assert data.train.cat.shape == (50, 0) and data.test.dense.shape == (7, 4)


def test_world_labels_masks_and_truth_are_consistent() -> None:
    data = load_world(seed=2, n_impressions=3000)
    for split in (data.train, data.valid, data.test):
        np.testing.assert_array_equal(split.masks["cvr"], split.labels["ctr"])
        assert (split.labels["ctcvr"] <= split.labels["ctr"]).all()
        np.testing.assert_array_equal(
            split.labels["ctcvr"], split.labels["ctr"] * split.labels["cvr"]
        )
        assert set(split.truth) == {"ctr", "cvr", "ctcvr"}
        assert ((split.truth["cvr"] >= 0) & (split.truth["cvr"] <= 1)).all()
    # a conversion is a follow-on click, which needs a click
    assert (data.train.labels["cvr"] <= data.train.labels["ctr"]).all()
    assert 0.02 < data.train.labels["ctr"].mean() < 0.15


def test_reindex_gives_unseen_values_the_missing_row() -> None:
    codes, buckets = reindex(np.array([3, 3, 8, 5, 8, 42]), np.array([0, 1, 2, 3]))
    assert buckets == 4  # 3, 5, 8 + the missing row
    assert codes.tolist() == [1, 1, 3, 2, 3, 0]


def test_split_indices_partition_and_depend_on_the_seed() -> None:
    parts = split_indices(101, [0.5, 0.25, 0.25], seed=7)
    assert sorted(np.concatenate(parts).tolist()) == list(range(101))
    assert [p.tolist() for p in parts] == [
        p.tolist() for p in split_indices(101, [0.5, 0.25, 0.25], 7)
    ]
    assert parts[0].tolist() != split_indices(101, [0.5, 0.25, 0.25], seed=8)[0].tolist()
    with pytest.raises(ValueError):
        split_indices(10, [0.5, 0.6], seed=0)


def test_capped_subsamples_every_split(census1: Dataset) -> None:
    small = census1.capped(500, seed=0)
    assert (len(small.train), len(small.valid), len(small.test)) == (500, 500, 500)
    assert "500 rows" in small.note
    assert census1.capped(None, seed=0) is census1
