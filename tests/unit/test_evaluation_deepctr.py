"""The DeepCTR-Torch baselines: quiet import, training on a tiny split, the PLE expert-count bug."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from evaluation.census import load_census
from evaluation.datasets import Dataset
from evaluation.deepctr_baseline import DeepCTRModel
from evaluation.experiments import Architecture, Variant, build_trainable
from evaluation.metrics import task_metrics
from evaluation.synthetic import load_synthetic
from evaluation.train import Budget, fit, predict_split


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_census() -> Dataset:
    return load_census(1, seed=0).capped(3000, seed=0)


def test_import_is_quiet_and_offline() -> None:
    # a fresh interpreter: in this one another test may have imported deepctr_torch already
    code = (
        "import threading; from evaluation.deepctr_baseline import import_deepctr; "
        "package = import_deepctr(); print(package.__version__, threading.active_count())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    # no version-check thread asking PyPI, and nothing printed about it
    assert done.stdout == "0.3.0 1\n"


@pytest.mark.parametrize("model", ["deepctr-mmoe", "deepctr-ple"])
def test_baseline_trains_on_a_tiny_census_split(tiny_census: Dataset, model: str) -> None:
    budget = Budget(epochs=2, batch_size=256)
    trainable = build_trainable(Variant(model), tiny_census, Architecture(), budget, seed=0)
    assert isinstance(trainable, DeepCTRModel)
    result = fit(trainable, tiny_census, budget, seed=0)
    for preds in result.test_preds.values():
        assert preds.shape == (3000,) and ((preds >= 0) & (preds <= 1)).all()
    metrics = task_metrics(tiny_census.tasks, result.test_preds, tiny_census.test)
    assert metrics["marital.auc"] > 0.8  # marital status is easy; an untrained model is 0.5


def test_baseline_regression_heads_and_dense_only_inputs() -> None:
    data = load_synthetic(0.5, seed=0, n_train=512, n_eval=64, dim=4)
    trainable = build_trainable(Variant("deepctr-mmoe"), data, Architecture(), Budget(), 0)
    preds = predict_split(trainable, data.test)
    assert set(preds) == {"y1", "y2"} and preds["y1"].shape == (64,)
    assert np.isfinite(preds["y1"]).all()


def test_deepctr_ple_cannot_have_more_shared_than_task_experts(tiny_census: Dataset) -> None:
    # Why our comparison uses 1 task + 1 shared expert: DeepCTR-Torch 0.3.0 builds
    # specific_expert_num shared experts. If a release fixes it, this test says so.
    config = {**Architecture().deepctr_config("deepctr-ple"), "shared_expert_num": 2}
    model = DeepCTRModel("ple", tiny_census, config, Budget(), seed=0)
    batch = tiny_census.test
    with pytest.raises(IndexError):
        model.predict(torch.from_numpy(batch.cat[:8]), torch.from_numpy(batch.dense[:8]))
