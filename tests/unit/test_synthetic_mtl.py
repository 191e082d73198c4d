"""MMoE paper's synthetic experiment, small: MoE gains over shared-bottom shrink as tasks align.

Ma et al. 2018 (fig. 4): at task correlation p = 0.5, MMoE (and here PLE) reach a lower
test loss than shared-bottom; at p = 1.0 the gap shrinks. This runs a small, fixed budget
(same data, steps, optimiser and depth for every model) over several seeds and compares
means; seeds were not picked. The result depends on the setup: with one-layer experts and
bottoms, or fewer samples/steps, shared-bottom won at both correlations in our trials
(MoE models overfit or were still undertrained), so do not shrink this budget lightly.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
import torch

from learner.datasets import make_synthetic_mtl
from learner.features import FeatureSpec
from learner.losses import LossConfig, MultiTaskLoss, Targets
from learner.models import RankingModel, build_model

logger = logging.getLogger(__name__)

DIM = 16
N_TRAIN = 16_000
N_TEST = 4_000
BATCH = 128
STEPS = 1_500  # the fixed budget, identical for every model
LR = 3e-3
SEEDS = (0, 1, 2)
TASKS = {"y1": "regression", "y2": "regression"}
# Same depth (two hidden layers before the towers) and expert width everywhere.
ARCHS: dict[str, dict[str, Any]] = {
    "shared_bottom": {"arch": "shared_bottom", "config": {"hidden": [64, 32]}},
    "mmoe": {"arch": "mmoe", "config": {"n_experts": 4, "expert_hidden": [64, 32]}},
    "ple": {
        "arch": "ple",
        "config": {
            "n_levels": 2,
            "n_task_experts": 1,
            "n_shared_experts": 2,
            "expert_hidden": [32],
        },
    },
}


def _model(arch: str) -> RankingModel:
    spec = FeatureSpec(dense=[f"x{i}" for i in range(DIM)])
    return build_model(
        {
            **ARCHS[arch],
            "tasks": TASKS,
            "esmm": False,
            "tower_hidden": [16],
            "features": spec.to_dict(),
            "missing_indicator": False,
        }
    )


def _test_mse(arch: str, correlation: float, seed: int) -> float:
    """Train `arch` for STEPS steps on one synthetic draw; return the mean test MSE of the tasks."""
    train, test = make_synthetic_mtl(N_TRAIN, DIM, correlation, seed, n_test=N_TEST)
    torch.manual_seed(seed)
    model = _model(arch)
    loss_fn = MultiTaskLoss.for_model(model, LossConfig(weighting="static"))
    opt = torch.optim.Adam(model.parameters(), lr=LR, fused=True)
    x, y = train.tensors()
    no_cat = torch.zeros(BATCH, 0, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat(
        [torch.randperm(N_TRAIN, generator=gen) for _ in range(STEPS * BATCH // N_TRAIN + 1)]
    )
    for step in range(STEPS):
        idx = order[step * BATCH : (step + 1) * BATCH]  # (B,)
        out = model(no_cat, x[idx])
        loss = loss_fn(out, Targets(labels={"y1": y[idx, 0], "y2": y[idx, 1]})).total
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    xt, yt = test.tensors()
    pred = model.predict(torch.zeros(len(xt), 0, dtype=torch.long), xt)
    mse = ((pred["y1"] - yt[:, 0]).square().mean() + (pred["y2"] - yt[:, 1]).square().mean()) / 2
    return float(mse)


@pytest.fixture(scope="module")
def results() -> dict[tuple[str, float], float]:
    """Mean test MSE over SEEDS per (arch, correlation)."""
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batches of 128 through tiny layers: threads only add overhead
    out: dict[tuple[str, float], float] = {}
    try:
        for correlation in (0.5, 1.0):
            for arch in ARCHS:
                losses = [_test_mse(arch, correlation, seed) for seed in SEEDS]
                out[arch, correlation] = sum(losses) / len(losses)
                logger.info("p=%s %s test_mse=%s", correlation, arch, [round(v, 3) for v in losses])
    finally:
        torch.set_num_threads(threads)
    logger.info("synthetic experiment took %.1f s", time.perf_counter() - start)
    return out


def _gap(results: dict[tuple[str, float], float], arch: str, correlation: float) -> float:
    """Test-loss reduction of `arch` over shared-bottom (positive = `arch` is better)."""
    return results["shared_bottom", correlation] - results[arch, correlation]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mmoe", "ple"])
def test_moe_beats_shared_bottom_at_half_correlation(
    results: dict[tuple[str, float], float], arch: str
) -> None:
    assert results[arch, 0.5] < results["shared_bottom", 0.5], results


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mmoe", "ple"])
def test_moe_gap_shrinks_when_tasks_align(
    results: dict[tuple[str, float], float], arch: str
) -> None:
    assert _gap(results, arch, 1.0) < _gap(results, arch, 0.5), results
