"""Masked per-task losses, weighting (static / UWL / decay), FNW and the stable ESMM BCE."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F  # noqa: N812  # the usual torch alias
from torch import Tensor

from learner.errors import ConfigError
from learner.features import FeatureSpec
from learner.losses import (
    LossConfig,
    LossWeighting,
    MultiTaskLoss,
    Targets,
    build_targets,
    fnw_weights,
    masked_task_loss,
    row_losses,
)
from learner.models import RankingModel, build_model, esmm_ctcvr_bce

KINDS = {"ctr": "binary", "cvr": "binary", "ctcvr": "binary", "ysl": "count"}


def _model(esmm: bool, **extra: object) -> RankingModel:
    torch.manual_seed(0)
    spec = FeatureSpec(dense=["a", "b"])
    return build_model(
        {
            "arch": "mmoe",
            "esmm": esmm,
            "features": spec.to_dict(),
            "config": {"n_experts": 2},
            **extra,
        }
    )


def _batch(n: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.zeros(n, 0, dtype=torch.long), torch.randn(n, 2, generator=gen)


def _outputs(n: int, seed: int = 0) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {t: torch.randn(n, generator=gen, requires_grad=True) for t in KINDS}


def test_masked_task_loss_matches_naive_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    loss, mask, weight = (
        torch.rand(10, generator=gen),
        torch.zeros(10),
        torch.rand(10, generator=gen),
    )
    mask[[1, 4, 7]] = 1.0
    expected = sum(mask[i] * weight[i] * loss[i] for i in range(10)) / max(1.0, float(mask.sum()))
    assert torch.allclose(masked_task_loss(loss, mask, weight), torch.as_tensor(expected))
    assert masked_task_loss(loss, torch.zeros(10)) == 0.0


def test_row_losses_per_kind() -> None:
    raw, y = torch.tensor([0.3, -1.0, 2.0]), torch.tensor([1.0, 0.0, 3.0])
    assert torch.allclose(
        row_losses(raw, y.clamp(max=1), "binary"),
        F.binary_cross_entropy(torch.sigmoid(raw), y.clamp(max=1), reduction="none"),
    )
    assert torch.allclose(row_losses(raw, y, "count"), (raw - torch.log1p(y)) ** 2)
    poisson = F.poisson_nll_loss(raw, y, log_input=True, full=False, reduction="none")
    assert torch.allclose(row_losses(raw, y, "count", "poisson"), poisson)
    assert torch.allclose(row_losses(raw, y, "regression"), (raw - y) ** 2)


@pytest.mark.parametrize("weighting", ["static", "uwl", "decay"])
def test_task_with_empty_sample_space_gives_zero_loss_and_zero_grad(weighting: str) -> None:
    model = _model(esmm=False)
    loss_fn = MultiTaskLoss.for_model(model, LossConfig(weighting=weighting))
    n = 8
    click = torch.zeros(n)  # nobody clicked: cvr and ysl have empty sample spaces
    targets = build_targets(click, click, click)
    targets.labels["cvr"] = torch.full((n,), float("nan"))  # garbage outside the space
    targets.labels["ysl"] = torch.full((n,), -5.0)
    result = loss_fn(model(*_batch(n)), targets, step=10)
    result.total.backward()
    floats = result.as_floats()
    assert floats["loss.cvr"] == 0.0 and floats["loss.ysl"] == 0.0
    assert floats["n.cvr"] == 0.0 and floats["n.ctr"] == n
    assert torch.isfinite(result.total)
    for task in ("cvr", "ysl"):
        for p in model.towers[task].parameters():
            assert p.grad is None or torch.equal(p.grad, torch.zeros_like(p)), task
    for p in model.towers["ctr"].parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    if weighting == "uwl":
        grad = loss_fn.weighting.log_vars.grad  # type: ignore[union-attr]
        assert grad is not None
        assert grad[loss_fn.trained_tasks.index("cvr")] == 0.0
        assert grad[loss_fn.trained_tasks.index("ctr")] != 0.0


def test_uwl_formula_default_constants_and_gradients() -> None:
    loss_fn = MultiTaskLoss(KINDS, LossConfig(weighting="uwl"))
    weighting = loss_fn.weighting
    assert weighting.log_vars is not None
    with torch.no_grad():
        weighting.log_vars.copy_(torch.tensor([0.5, -0.2, 0.1, 0.3]))
    assert weighting.c.tolist() == [1.0, 1.0, 1.0, 2.0]  # binary 1, count 2 (DESIGN.md 1)
    losses = {t: torch.tensor(v) for t, v in zip(KINDS, [0.7, 0.4, 0.2, 1.5], strict=True)}
    counts = {t: torch.tensor(4.0) for t in KINDS}
    total = weighting(losses, counts)
    s, c = weighting.log_vars.detach(), weighting.c
    expected = sum(
        math.exp(-float(s[k])) * float(c[k]) * float(losses[t]) + float(s[k])
        for k, t in enumerate(KINDS)
    )
    assert total.item() == pytest.approx(expected, rel=1e-6)
    total.backward()
    assert weighting.log_vars.grad is not None
    assert (weighting.log_vars.grad != 0).all()  # d/ds = 1 - exp(-s) c L, nonzero here


def test_uwl_params_receive_gradients_through_the_model_loss() -> None:
    model = _model(esmm=True)
    loss_fn = MultiTaskLoss.for_model(model, LossConfig(weighting="uwl"))
    targets = build_targets(
        torch.tensor([1.0, 0, 1, 0]), torch.tensor([1.0, 0, 0, 0]), torch.ones(4)
    )
    loss_fn(model(*_batch(4)), targets).total.backward()
    assert loss_fn.weighting.log_vars is not None
    grad = loss_fn.weighting.log_vars.grad
    assert grad is not None and (grad != 0).all()
    assert loss_fn.trained_tasks == ("ctr", "ctcvr", "ysl")  # ESMM: cvr only through ctcvr


def test_decay_schedule() -> None:
    config = LossConfig(
        weighting="decay", weights={"ctr": 2.0}, decay_gamma=0.9, decay_gammas={"ysl": 0.5}
    )
    weighting = MultiTaskLoss(KINDS, config).weighting
    for step in (0, 1, 7):
        got = weighting.multipliers(step).tolist()
        want = [2.0 * 0.9**step, 0.9**step, 0.9**step, 0.5**step]
        assert got == pytest.approx(want, rel=1e-6)
    losses = {t: torch.tensor(1.0) for t in KINDS}
    counts = {t: torch.tensor(1.0) for t in KINDS}
    assert weighting(losses, counts, step=3).item() == pytest.approx(
        2 * 0.9**3 + 2 * 0.9**3 + 0.5**3, rel=1e-6
    )


def test_static_weights_and_missing_task_default() -> None:
    weighting = LossWeighting(["a", "b"], "static", weights={"a": 3.0})
    losses = {"a": torch.tensor(2.0), "b": torch.tensor(5.0)}
    counts = {"a": torch.tensor(1.0), "b": torch.tensor(0.0)}  # b absent from this batch
    assert weighting(losses, counts).item() == 6.0
    assert list(weighting.parameters()) == []


def test_fnw_weights_values() -> None:
    p = torch.tensor([0.2, 0.2, 0.9, 0.9])
    y = torch.tensor([1.0, 0.0, 1.0, 0.0])
    expected = [1.2, 0.8 * 1.2, 1.9, 0.1 * 1.9]
    assert fnw_weights(p, y).tolist() == pytest.approx(expected)
    assert not fnw_weights(p.requires_grad_(), y).requires_grad  # detached


def test_fnw_applies_only_to_flagged_rows_and_binary_tasks() -> None:
    n = 6
    out = _outputs(n, seed=3)
    click = torch.tensor([1.0, 0, 1, 0, 1, 0])
    fnw = torch.tensor([0.0, 1, 1, 0, 0, 1])
    targets = build_targets(click, click, click * 2, ysl_space="all", fnw=fnw)
    static = LossConfig(weighting="static", weights={"ctr": 0.5})
    plain = MultiTaskLoss(KINDS, replace(static, fnw=False))(out, targets).as_floats()
    weighted = MultiTaskLoss(KINDS, static)(out, targets).as_floats()
    assert weighted["loss.ysl"] == plain["loss.ysl"]  # not a binary task
    p = torch.sigmoid(out["ctr"].detach())
    w = torch.where(fnw > 0, fnw_weights(p, click), 1.0)
    bce = F.binary_cross_entropy_with_logits(out["ctr"].detach(), click, reduction="none")
    assert weighted["loss.ctr"] == pytest.approx(float((w * bce).mean()), rel=1e-6)
    assert weighted["loss.ctr"] != pytest.approx(plain["loss.ctr"])
    assert weighted["w.ctr"] == 0.5
    fnw_total = sum(weighted[f"w.{t}"] * weighted[f"loss.{t}"] for t in KINDS)
    assert weighted["loss"] == pytest.approx(fnw_total, rel=1e-6)


def test_fnw_gradient_treats_weights_as_constants() -> None:
    logits = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    label = torch.tensor([1.0, 0.0, 0.0])
    loss_fn = MultiTaskLoss({"ctr": "binary"}, LossConfig(weighting="static"))
    targets = Targets(labels={"ctr": label}, fnw=torch.ones(3))
    loss_fn({"ctr": logits}, targets).total.backward()
    w = fnw_weights(torch.sigmoid(logits.detach()), label)
    manual = (w * (torch.sigmoid(logits.detach()) - label)) / 3  # d BCE / d logit, weighted
    assert logits.grad is not None
    assert torch.allclose(logits.grad, manual, atol=1e-6)


def test_esmm_ctcvr_bce_matches_naive_and_stays_finite() -> None:
    a = torch.tensor([0.3, -2.0, 4.0, 1.0])
    b = torch.tensor([-1.0, 0.5, 3.0, -0.2])
    y = torch.tensor([1.0, 0.0, 1.0, 0.0])
    p = torch.sigmoid(a) * torch.sigmoid(b)
    naive = F.binary_cross_entropy(p, y, reduction="none")
    assert torch.allclose(esmm_ctcvr_bce(a, b, y), naive, atol=1e-5)

    extreme_a = torch.tensor([100.0, 100.0, -100.0, -100.0, 60.0], requires_grad=True)
    extreme_b = torch.tensor([100.0, -100.0, 100.0, -100.0, 60.0], requires_grad=True)
    for label in (0.0, 1.0):
        loss = esmm_ctcvr_bce(extreme_a, extreme_b, torch.full((5,), label))
        assert torch.isfinite(loss).all(), label
        torch.autograd.backward(loss.sum())  # Tensor.backward is untyped in torch
        assert extreme_a.grad is not None and extreme_b.grad is not None
        assert torch.isfinite(extreme_a.grad).all() and torch.isfinite(extreme_b.grad).all()


def test_esmm_cvr_trained_directly_only_when_asked() -> None:
    model = _model(esmm=True)
    click = torch.tensor([1.0, 1, 0, 0])
    targets = build_targets(click, torch.tensor([1.0, 0, 0, 0]), torch.zeros(4))
    only_ctcvr = MultiTaskLoss.for_model(model)
    with_cvr = MultiTaskLoss.for_model(model, LossConfig(esmm_cvr_loss=True))
    out = model(*_batch(4))
    assert "cvr" not in only_ctcvr(out, targets).per_task
    assert with_cvr(out, targets).as_floats()["n.cvr"] == 2.0
    # cvr's tower still learns through ctcvr.
    only_ctcvr(out, targets).total.backward()
    grads = [p.grad for p in model.towers["cvr"].parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_build_targets_sample_spaces() -> None:
    click = torch.tensor([1.0, 0.0])
    conversion = torch.tensor([1.0, 0.0])
    ysl = torch.tensor([3.0, 0.0])
    clicked = build_targets(click, conversion, ysl)
    assert clicked.masks["cvr"].tolist() == [1.0, 0.0]
    assert clicked.masks["ysl"].tolist() == [1.0, 0.0]
    assert clicked.masks["ctcvr"].tolist() == [1.0, 1.0]
    assert clicked.labels["ctcvr"].tolist() == [1.0, 0.0]
    assert build_targets(click, conversion, ysl, ysl_space="all").masks["ysl"].tolist() == [1, 1]
    with pytest.raises(ValueError, match="ysl_space"):
        build_targets(click, conversion, ysl, ysl_space="some")


def test_missing_labels_and_bad_configs_raise() -> None:
    loss_fn = MultiTaskLoss(KINDS)
    with pytest.raises(ValueError, match="cvr"):
        loss_fn(_outputs(2), Targets(labels={"ctr": torch.ones(2)}))
    with pytest.raises(ConfigError):
        LossConfig(weighting="gradnorm")
    with pytest.raises(ConfigError):
        LossConfig.from_dict({"weightning": "uwl"})
    with pytest.raises(ConfigError):
        LossConfig(weighting="decay", decay_gamma=1.5)
    config = LossConfig(weighting="decay", weights={"ctr": 2.0})
    assert LossConfig.from_dict(config.to_dict()) == config


def test_targets_to_device_keeps_everything() -> None:
    targets = build_targets(torch.ones(2), torch.ones(2), torch.ones(2), weights=torch.ones(2))
    moved = targets.to("cpu")
    assert (
        moved.labels.keys() == targets.labels.keys() and moved.masks.keys() == targets.masks.keys()
    )
    assert moved.weights is not None and moved.fnw is None
