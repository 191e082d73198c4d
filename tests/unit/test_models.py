"""Architectures: shapes, gates, ESMM, PLE wiring against a naive reference, snapshots."""

from __future__ import annotations

import json
import logging
import time
from typing import Any, cast

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F  # noqa: N812  # the usual torch alias
from torch import Tensor, nn

from learner.errors import ConfigError
from learner.features import CategoricalField, FeatureSpec
from learner.losses import MultiTaskLoss, build_targets
from learner.models import (
    CGC,
    PLE,
    CGCConfig,
    Expert,
    ExpertGroup,
    ExtractionLayer,
    Gate,
    MMoE,
    MMoEConfig,
    PLEConfig,
    RankingModel,
    SharedBottom,
    SharedBottomConfig,
    build_model,
    load_model,
)

logger = logging.getLogger(__name__)

SPEC = FeatureSpec(
    categorical=[CategoricalField("user_id", 64, 4), CategoricalField("item_id", 32, 4)],
    dense=["price", "age", "ctr_1h"],
)
B = 6
ARCH_CASES: list[tuple[str, dict[str, Any]]] = [
    ("single", {}),
    ("shared_bottom", {}),
    ("omoe", {"n_experts": 3}),
    ("mmoe", {"n_experts": 3}),
    ("cgc", {"n_task_experts": 2, "n_shared_experts": 1}),
    ("ple", {"n_levels": 1}),
    ("ple", {"n_levels": 2, "n_task_experts": 2}),
    ("ple", {"n_levels": 3, "expert_hidden": [8, 8]}),
]


def _args(arch: str, config: dict[str, Any], esmm: bool, **extra: Any) -> dict[str, Any]:
    return {
        "arch": arch,
        "config": config,
        "esmm": esmm,
        "features": SPEC.to_dict(),
        **extra,
    }


def _inputs(seed: int = 0, n: int = B) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    cat = torch.stack(
        [torch.randint(0, f.buckets, (n,), generator=gen) for f in SPEC.categorical], dim=1
    )
    dense = torch.randn(n, len(SPEC.dense), generator=gen) * 3 + 1
    dense[0, 1] = float("nan")
    return cat, dense


def _expected_gates(model: RankingModel) -> dict[str, int]:
    """Gate key -> number of experts it mixes, from the config alone."""
    cfg, heads = model.model_args["config"], model.head_tasks
    arch = model.model_args["arch"]
    if arch == "mmoe":
        return {f"level0/{t}": cfg["n_experts"] for t in heads}
    if arch == "omoe":
        return {"level0/shared": cfg["n_experts"]}
    if arch in ("cgc", "ple"):
        n_levels = cfg.get("n_levels", 1)
        n_t, n_s = cfg["n_task_experts"], cfg["n_shared_experts"]
        gates = {f"level{j}/{t}": n_t + n_s for j in range(n_levels) for t in heads}
        gates.update({f"level{j}/shared": len(heads) * n_t + n_s for j in range(n_levels - 1)})
        return gates
    return {}


@pytest.mark.parametrize("esmm", [True, False], ids=["esmm", "no_esmm"])
@pytest.mark.parametrize(("arch", "config"), ARCH_CASES, ids=[f"{a}{c}" for a, c in ARCH_CASES])
def test_shapes_predictions_and_gates(arch: str, config: dict[str, Any], esmm: bool) -> None:
    torch.manual_seed(0)
    model = build_model(_args(arch, config, esmm))
    cat, dense = _inputs()
    out = model(cat, dense)
    assert list(out) == ["ctr", "cvr", "ctcvr", "ysl"]
    assert all(v.shape == (B,) and torch.isfinite(v).all() for v in out.values())
    assert model.head_tasks == (("ctr", "cvr", "ysl") if esmm else ("ctr", "cvr", "ctcvr", "ysl"))
    gates = model.gate_weights()
    expected = _expected_gates(model)
    assert {k: tuple(v.shape) for k, v in gates.items()} == {k: (B, n) for k, n in expected.items()}
    for key, w in gates.items():
        assert torch.allclose(w.sum(-1), torch.ones(B)), key
        assert (w >= 0).all(), key
    model.eval()
    pred = model.predict(cat, dense)
    for task in ("ctr", "cvr", "ctcvr"):
        assert ((pred[task] >= 0) & (pred[task] <= 1)).all(), task
    assert (pred["ysl"] >= 0).all()
    loss = MultiTaskLoss.for_model(model)(out, build_targets(*_labels())).total
    loss.backward()
    assert torch.isfinite(loss)


def _labels() -> tuple[Tensor, Tensor, Tensor]:
    click = torch.tensor([1.0, 0, 1, 0, 1, 0])
    conversion = torch.tensor([1.0, 0, 0, 0, 1, 0])
    ysl = torch.tensor([2.0, 0, 0, 0, 1, 0])
    return click, conversion, ysl


def test_esmm_ctcvr_is_the_product_of_ctr_and_cvr() -> None:
    torch.manual_seed(1)
    model = build_model(_args("ple", {}, esmm=True)).eval()
    cat, dense = _inputs()
    pred = model.predict(cat, dense)
    assert torch.equal(pred["ctcvr"], pred["ctr"] * pred["cvr"])
    out = model(cat, dense)
    assert torch.allclose(torch.sigmoid(out["ctcvr"]), pred["ctcvr"], atol=1e-6)


@pytest.mark.parametrize("count_loss", ["log1p_mse", "poisson"])
def test_ysl_prediction_scale(count_loss: str) -> None:
    model = build_model(_args("mmoe", {}, esmm=False, count_loss=count_loss)).eval()
    cat, dense = _inputs()
    raw = model(cat, dense)["ysl"]
    expected = torch.exp(raw) if count_loss == "poisson" else torch.expm1(raw).clamp(min=0)
    assert torch.allclose(model.predict(cat, dense)["ysl"], expected)


def _linear_relu(expert: Expert, x: Tensor) -> Tensor:
    for layer in expert.net:
        if isinstance(layer, nn.Linear):
            x = F.relu(x @ layer.weight.T + layer.bias)
    return x


def _mix(selector: Tensor, gate: nn.Linear, outs: list[Tensor]) -> Tensor:
    w = torch.softmax(selector @ gate.weight.T + gate.bias, dim=-1)
    return sum((w[:, i : i + 1] * o for i, o in enumerate(outs)), torch.zeros_like(outs[0]))


def _experts(group: nn.Module) -> list[Expert]:
    return [cast(Expert, e) for e in cast(ExpertGroup, group).experts]


def _proj(gate: nn.Module) -> nn.Linear:
    return cast(Gate, gate).proj


def _reference_ple(ple: PLE, x: Tensor) -> dict[str, Tensor]:
    """PLE written out per expert and gate, as in the paper's equations."""
    tasks = ple.tasks
    task_in, shared_in = dict.fromkeys(tasks, x), x
    for module in ple.levels:
        level = cast(ExtractionLayer, module)
        shared = [_linear_relu(e, shared_in) for e in _experts(level.shared_experts)]
        own = {
            t: [_linear_relu(e, task_in[t]) for e in _experts(level.task_experts[t])] for t in tasks
        }
        fused = {t: _mix(task_in[t], _proj(level.task_gates[t]), own[t] + shared) for t in tasks}
        if level.shared_gate is not None:
            every = [o for t in tasks for o in own[t]] + shared
            shared_in = _mix(shared_in, level.shared_gate.proj, every)
        task_in = fused
    return task_in


@pytest.mark.parametrize("n_levels", [1, 2, 3])
def test_ple_matches_naive_reference(n_levels: int) -> None:
    torch.manual_seed(n_levels)
    config = PLEConfig(
        n_levels=n_levels, n_task_experts=2, n_shared_experts=3, expert_hidden=(5, 4)
    )
    ple = PLE(config, in_dim=7, tasks=("a", "b", "c"))
    x = torch.randn(9, 7)
    got, want = ple(x), _reference_ple(ple, x)
    for t in ("a", "b", "c"):
        assert torch.allclose(got[t], want[t], atol=1e-6), t


def test_cgc_equals_one_level_ple() -> None:
    torch.manual_seed(0)
    cgc = CGC(CGCConfig(2, 1, (6,)), in_dim=5, tasks=("a", "b"))
    ple = PLE(
        PLEConfig(n_levels=1, n_task_experts=2, n_shared_experts=1, expert_hidden=(6,)),
        5,
        ("a", "b"),
    )
    ple.load_state_dict(
        {k.replace("layer.", "levels.0.", 1): v for k, v in cgc.state_dict().items()}
    )
    x = torch.randn(4, 5)
    assert all(torch.equal(cgc(x)[t], ple(x)[t]) for t in ("a", "b"))
    assert cgc.gate_weights().keys() == ple.gate_weights().keys() == {"level0/a", "level0/b"}


def test_mmoe_with_one_expert_is_shared_bottom() -> None:
    torch.manual_seed(0)
    bottom = SharedBottom(SharedBottomConfig(hidden=(8, 4)), in_dim=5, tasks=("a", "b"))
    mmoe = MMoE(MMoEConfig(n_experts=1, expert_hidden=(8, 4)), in_dim=5, tasks=("a", "b"))
    mmoe.experts.experts[0].load_state_dict(bottom.bottom.state_dict())
    x = torch.randn(4, 5)
    for t in ("a", "b"):
        assert torch.allclose(mmoe(x)[t], bottom(x)[t])


@pytest.mark.parametrize("esmm", [True, False], ids=["esmm", "no_esmm"])
def test_snapshot_round_trip_is_bit_identical(esmm: bool) -> None:
    torch.manual_seed(0)
    model = build_model(_args("ple", {"n_levels": 2}, esmm, norm_max_count=1e6))
    model(*_inputs(seed=1))  # train mode: moves the running normalisation off its init
    model.eval()
    blob = safetensors.torch.save(model.state_dict())
    meta = json.dumps(model.model_args)

    torch.manual_seed(123)  # a fresh init differs: the loaded weights must do all the work
    assert not torch.equal(
        build_model(json.loads(meta)).eval().predict(*_inputs())["ctr"],
        model.predict(*_inputs())["ctr"],
    )
    again = load_model(json.loads(meta), safetensors.torch.load(blob))
    assert again.model_args == model.model_args
    cat, dense = _inputs(seed=2, n=50)
    want, got = model.predict(cat, dense), again.predict(cat, dense)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[t], got[t]) for t in want)


def test_load_model_is_strict() -> None:
    model = build_model(_args("mmoe", {}, esmm=True))
    state = model.state_dict()
    del state["encoder.norm.mean"]
    with pytest.raises(RuntimeError, match=r"encoder\.norm\.mean"):
        load_model(model.model_args, state)


def test_model_args_fill_defaults_and_rebuild_identically() -> None:
    model = build_model({"arch": "mmoe"})
    args = model.model_args
    assert args["config"] == {"n_experts": 4, "expert_hidden": [64], "dropout": 0.0}
    assert args["tasks"] == {"ctr": "binary", "cvr": "binary", "ctcvr": "binary", "ysl": "count"}
    assert build_model(json.loads(json.dumps(args))).model_args == args
    args["config"]["n_experts"] = 99  # model_args hands out a copy
    assert model.model_args["config"]["n_experts"] == 4


@pytest.mark.parametrize(
    "bad",
    [
        {"arch": "transformer"},
        {"arch": "mmoe", "config": {"n_expert": 3}},
        {"arch": "ple", "config": {"n_levels": 0}},
        {"esmm": True, "tasks": {"ctr": "binary", "ysl": "count"}},
        {"tasks": {"ctr": "ordinal"}, "esmm": False},
        {"tasks": {"Bad.Name": "binary"}, "esmm": False},
        {"count_loss": "huber"},
        {"format_version": 99},
        {"learning_rate": 0.1},
        {"features": {"categorical": [], "dense": []}},
    ],
)
def test_bad_model_args_raise_config_error(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        build_model(bad)


def test_custom_regression_tasks() -> None:
    spec = FeatureSpec(dense=["x0", "x1"])
    model = build_model(
        {
            "arch": "cgc",
            "tasks": {"y1": "regression", "y2": "regression"},
            "esmm": False,
            "features": spec.to_dict(),
        }
    ).eval()
    out = model.predict(torch.zeros(3, 0, dtype=torch.long), torch.randn(3, 2))
    assert list(out) == ["y1", "y2"] and out["y1"].shape == (3,)


def test_default_model_trains_a_batch_and_logs_speed() -> None:
    torch.manual_seed(0)
    model = build_model({})
    loss_fn = MultiTaskLoss.for_model(model)
    params = list(model.parameters()) + list(loss_fn.parameters())
    opt = torch.optim.Adam(params, lr=1e-3, fused=True)
    n = 1024
    cat = torch.stack(
        [torch.randint(0, f.buckets, (n,)) for f in model.args.features.categorical], dim=1
    )
    dense = torch.randn(n, len(model.args.features.dense))
    click = (torch.rand(n) < 0.2).float()
    conversion = click * (torch.rand(n) < 0.5).float()
    targets = build_targets(click, conversion, conversion * 2)
    losses = []
    start = time.perf_counter()
    for _ in range(5):
        result = loss_fn(model(cat, dense), targets)
        result.total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(result.total.detach()))
    rate = 5 * n / (time.perf_counter() - start)
    logger.info("default PLE: %.0f samples/s at batch %d (fused Adam, cold)", rate, n)
    assert losses[-1] < losses[0]


def test_fuse_training_and_inference_forms_agree() -> None:
    from learner.models.gates import fuse

    torch.manual_seed(0)
    weights = torch.softmax(torch.randn(257, 5), dim=-1)  # (B, E)
    experts = list(torch.randn(5, 257, 33))  # E x (B, H)
    with torch.no_grad():
        inference = fuse(weights, experts)  # the weighted sum of the list
    training = fuse(weights, experts)  # the stacked multiply-and-sum form (grad enabled)
    assert inference.shape == training.shape == (257, 33)
    torch.testing.assert_close(training, inference, rtol=1e-6, atol=1e-6)
    manual = torch.einsum("be,ebh->bh", weights, torch.stack(experts))
    torch.testing.assert_close(inference, manual, rtol=1e-5, atol=1e-6)
