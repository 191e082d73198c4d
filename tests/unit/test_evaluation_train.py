"""The offline training loop, metrics and results aggregation of `mtlstream evaluate`."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from evaluation.datasets import Dataset, Split
from evaluation.experiments import Architecture, RunRecord, Variant, build_trainable, variants
from evaluation.metrics import auc, selection_score, task_metrics, truth_auc
from evaluation.report import mtl_gains, results_markdown
from evaluation.train import Budget, LearnerModel, fit
from learner.features import CategoricalField, FeatureSpec
from learner.models import RankingModel


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _toy(n: int, seed: int) -> Split:
    """Task a depends on the category, task b on the dense value; b only on masked rows."""
    rng = np.random.default_rng(seed)
    cat = rng.integers(1, 5, size=(n, 1)).astype(np.int64)  # (n, 1)
    dense = rng.normal(size=(n, 1)).astype(np.float32)  # (n, 1)
    a = (rng.random(n) < np.where(cat[:, 0] >= 3, 0.9, 0.1)).astype(np.float32)
    b = (dense[:, 0] + 0.3 * rng.normal(size=n) > 0).astype(np.float32)
    mask = (rng.random(n) < 0.5).astype(np.float32)
    return Split(cat, dense, {"a": a, "b": b}, masks={"b": mask})


def toy_dataset() -> Dataset:
    spec = FeatureSpec([CategoricalField("c", 5, 4)], ["x"])
    return Dataset(
        "toy", {"a": "binary", "b": "binary"}, spec, _toy(2000, 0), _toy(500, 1), _toy(500, 2)
    )


def test_our_models_are_the_learners_models_with_its_optimizers() -> None:
    data = toy_dataset()
    trainable = build_trainable(Variant("ple"), data, Architecture(), Budget(), seed=0)
    assert isinstance(trainable, LearnerModel)
    assert isinstance(trainable.module, RankingModel)
    kinds = [type(o).__name__ for o in trainable.optimizers]
    assert kinds == ["Adam", "SparseAdam"]  # as Learner._make_optimizers
    assert all(m.sparse for m in trainable.module.modules() if isinstance(m, nn.Embedding))
    split = _dense_only(data.train)
    dense_only = Dataset("d", data.tasks, FeatureSpec(dense=["x"]), split, split, split)
    trainable = build_trainable(Variant("mmoe"), dense_only, Architecture(), Budget(), seed=0)
    assert [type(o).__name__ for o in trainable.optimizers] == ["Adam"]


def _dense_only(split: Split) -> Split:
    return Split(split.cat[:, :0], split.dense, split.labels, split.masks)


def test_fit_learns_and_keeps_the_best_validation_epoch() -> None:
    data = toy_dataset()
    budget = Budget(epochs=4, batch_size=64)
    trainable = build_trainable(Variant("mmoe"), data, Architecture(), budget, seed=0)
    result = fit(trainable, data, budget, seed=0)
    assert len(result.valid_scores) == 4 and result.steps == 4 * math.ceil(2000 / 64)
    assert result.valid_score == max(result.valid_scores)
    assert result.valid_scores[result.best_epoch - 1] == result.valid_score
    metrics = task_metrics(data.tasks, result.test_preds, data.test)
    assert metrics["a.auc"] > 0.85 and metrics["b.auc"] > 0.85


def test_fit_is_deterministic_for_a_seed() -> None:
    data = toy_dataset()
    budget = Budget(epochs=1, batch_size=128)

    def preds(seed: int) -> np.ndarray:
        trainable = build_trainable(Variant("cgc"), data, Architecture(), budget, seed)
        return fit(trainable, data, budget, seed).test_preds["a"]

    np.testing.assert_array_equal(preds(3), preds(3))
    assert not np.array_equal(preds(3), preds(4))


def test_task_metrics_score_each_task_over_its_mask() -> None:
    split = _toy(400, 5)
    perfect = {"a": split.labels["a"].astype(np.float64), "b": split.labels["b"] * 0.0}
    inside = split.masks["b"] > 0
    perfect["b"][inside] = split.labels["b"][inside]  # right inside the mask, wrong outside
    perfect["b"][~inside] = 1.0 - split.labels["b"][~inside]
    metrics = task_metrics({"a": "binary", "b": "binary"}, perfect, split)
    assert metrics == {"a.auc": 1.0, "b.auc": 1.0}
    mse = task_metrics({"a": "regression"}, {"a": split.labels["a"] + 0.5}, split)
    assert mse == {"a.mse": pytest.approx(0.25)}
    assert selection_score({"a": "regression"}, {"a": split.labels["a"] + 0.0}, split) == 1.0


def test_auc_is_nan_for_one_class() -> None:
    assert math.isnan(auc(np.zeros(4), np.arange(4.0)))


def test_truth_auc_matches_a_pairwise_reference() -> None:
    rng = np.random.default_rng(0)
    p, s = rng.random(30), rng.random(30)
    num = den = 0.0
    for i in range(30):  # a positive row i against a negative row j, weights p_i (1 - p_j)
        for j in range(30):
            w = p[i] * (1 - p[j])
            num += w * (1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0)
            den += w
    assert truth_auc(s, p) == pytest.approx(num / den)
    assert truth_auc(p, p) > truth_auc(1.0 - p, p)


def _record(variant: str, model: str, seed: int, value: float, metric: str = "a.auc") -> RunRecord:
    return RunRecord("d", variant, model, "static", "raw", False, seed, {metric: value}, 1, 1, 0.1)


def test_mtl_gain_is_model_minus_single_per_seed_and_signed_for_mse() -> None:
    records = [
        _record("single", "single", 0, 0.80),
        _record("single", "single", 1, 0.70),
        _record("ple", "ple", 0, 0.85),
        _record("ple", "ple", 1, 0.72),
    ]
    gains = mtl_gains(records)
    assert gains["d", "ple", 0]["a.auc"] == pytest.approx(0.05)
    assert gains["d", "ple", 1]["a.auc"] == pytest.approx(0.02)
    mse = mtl_gains(
        [_record("single", "single", 0, 1.0, "y.mse"), _record("m", "mmoe", 0, 0.75, "y.mse")]
    )
    assert mse["d", "m", 0]["y.mse"] == pytest.approx(0.25)  # lower MSE = positive gain
    table = results_markdown(records, {"d": "a note"}, ["# header"])
    assert "| ple | 0.7850 ± 0.0919 |" in table and "a note" in table


def test_variants_cross_options_for_our_models_only() -> None:
    labels = [
        v.label for v in variants(["mmoe", "deepctr-mmoe"], ["static", "uwl"], ["raw", "log1p"])
    ]
    assert labels == ["mmoe", "mmoe/uwl", "mmoe/log1p", "mmoe/uwl/log1p", "deepctr-mmoe"]
    assert [v.label for v in variants(["ple"], esmm_forms=(False, True))] == ["ple", "ple+esmm"]
    with pytest.raises(ValueError, match="unknown model"):
        Variant("xgboost")
