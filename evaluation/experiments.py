"""What one comparison runs: model variants, their shared sizes, and one training run each.

A variant is a model (ours: an arch of `learner.models`; or a DeepCTR-Torch baseline) with
a loss weighting (equal static weights or UWL), a target form for regression tasks (raw MSE,
or MSE on log1p(y) through the learner's "count" kind) and, on the simulator's world, the
ESMM composition. Sizes are shared: every expert, bottom and single-task network is built
from the same `Architecture`, ours and DeepCTR's alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from evaluation.datasets import Dataset
from evaluation.deepctr_baseline import DeepCTRModel
from evaluation.metrics import task_metrics, truth_metrics
from evaluation.train import Budget, LearnerModel, Trainable, fit
from learner.losses import LossConfig

__all__ = [
    "MODELS",
    "TARGETS",
    "WEIGHTINGS",
    "Architecture",
    "RunRecord",
    "Variant",
    "build_trainable",
    "model_args",
    "run_variant",
    "variants",
]

logger = logging.getLogger(__name__)

OUR_MODELS = ("single", "shared_bottom", "omoe", "mmoe", "cgc", "ple")
DEEPCTR_MODELS = ("deepctr-mmoe", "deepctr-ple")
MODELS = OUR_MODELS + DEEPCTR_MODELS
WEIGHTINGS = ("static", "uwl")
TARGETS = ("raw", "log1p")  # regression labels as they are, or log1p-smoothed


@dataclass(frozen=True)
class Architecture:
    """Sizes every model of a comparison shares."""

    expert_hidden: tuple[int, ...] = (64,)  # each expert's (and single-task net's) layers
    n_experts: int = 3  # OMoE / MMoE experts; CGC and PLE: 1 per task + 1 shared per level
    ple_levels: int = 2  # PLE extraction levels
    tower_hidden: tuple[int, ...] = (32,)  # task towers

    def arch_config(self, model: str) -> dict[str, Any]:
        """Return the `ModelArgs.config` of one of our archs."""
        hidden = list(self.expert_hidden)
        if model == "single":
            return {"hidden": hidden}
        if model == "shared_bottom":
            # as wide as the experts together: the same first-layer parameter count
            return {"hidden": [self.n_experts * hidden[0], *hidden[1:]]}
        if model in ("omoe", "mmoe"):
            return {"n_experts": self.n_experts, "expert_hidden": hidden}
        # CGC / PLE: one expert per task and one shared; DeepCTR's PLE cannot use more
        # shared than task experts (see evaluation.deepctr_baseline), so both use 1 + 1.
        config: dict[str, Any] = {
            "n_task_experts": 1,
            "n_shared_experts": 1,
            "expert_hidden": hidden,
        }
        if model == "ple":
            config["n_levels"] = self.ple_levels
        return config

    def deepctr_config(self, model: str) -> dict[str, Any]:
        """Return DeepCTR-Torch keyword arguments of the same sizes (linear gates, as ours)."""
        common: dict[str, Any] = {
            "expert_dnn_hidden_units": self.expert_hidden,
            "gate_dnn_hidden_units": (),
            "tower_dnn_hidden_units": self.tower_hidden,
        }
        if model == "deepctr-mmoe":
            return {"num_experts": self.n_experts, **common}
        return {
            "shared_expert_num": 1,
            "specific_expert_num": 1,
            "num_levels": self.ple_levels,
            **common,
        }


@dataclass(frozen=True)
class Variant:
    """One row of a results table."""

    model: str  # one of MODELS
    weighting: str = "static"  # "static" (equal weights) | "uwl"
    target: str = "raw"  # regression tasks: "raw" | "log1p"
    esmm: bool = False  # ctcvr = p_ctr * p_cvr (needs tasks ctr, cvr, ctcvr)

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; known: {', '.join(MODELS)}")
        if self.weighting not in WEIGHTINGS or self.target not in TARGETS:
            raise ValueError(f"bad weighting/target {self.weighting!r}/{self.target!r}")
        if self.is_deepctr and (self.weighting, self.target, self.esmm) != ("static", "raw", False):
            raise ValueError("DeepCTR baselines run with static weights, raw targets, no ESMM")

    @property
    def is_deepctr(self) -> bool:
        """Whether this is a DeepCTR-Torch baseline."""
        return self.model in DEEPCTR_MODELS

    @property
    def label(self) -> str:
        """The row name: model, then the non-default options (e.g. "ple+esmm/uwl/log1p")."""
        name = self.model + ("+esmm" if self.esmm else "")
        if self.weighting != "static":
            name += f"/{self.weighting}"
        if self.target != "raw":
            name += f"/{self.target}"
        return name


def variants(
    models: Sequence[str],
    weightings: Sequence[str] = ("static",),
    targets: Sequence[str] = ("raw",),
    esmm_forms: Sequence[bool] = (False,),
) -> list[Variant]:
    """Return every combination for our models; DeepCTR baselines once each (static, raw).

    Examples
    --------
    >>> [v.label for v in variants(["ple", "deepctr-ple"], ["static", "uwl"])]
    ['ple', 'ple/uwl', 'deepctr-ple']
    """
    out: list[Variant] = []
    for model in models:
        if model in DEEPCTR_MODELS:
            out.append(Variant(model))
            continue
        out += [Variant(model, w, t, e) for e in esmm_forms for t in targets for w in weightings]
    return out


def model_args(variant: Variant, data: Dataset, arch: Architecture) -> dict[str, Any]:
    """Return the `ModelArgs` dict of one of our models for `data`."""
    kind = {"raw": "regression", "log1p": "count"}[variant.target]
    tasks = {t: (k if k == "binary" else kind) for t, k in data.tasks.items()}
    return {
        "arch": variant.model,
        "config": arch.arch_config(variant.model),
        "tasks": tasks,
        "esmm": variant.esmm,
        "count_loss": "log1p_mse",
        "tower_hidden": list(arch.tower_hidden),
        "features": data.spec.to_dict(),
        # indicator columns only where values can be missing (they are constant otherwise)
        "missing_indicator": bool(np.isnan(data.train.dense).any()),
    }


def build_trainable(
    variant: Variant, data: Dataset, arch: Architecture, budget: Budget, seed: int
) -> Trainable:
    """Build a freshly initialised model (init seeded by `seed`) with its loss and optimizers."""
    torch.manual_seed(seed)
    if variant.is_deepctr:
        config = arch.deepctr_config(variant.model)
        return DeepCTRModel(variant.model.removeprefix("deepctr-"), data, config, budget, seed)
    # fnw is for delayed-feedback corrections of the stream; offline labels are final.
    loss = LossConfig(weighting=variant.weighting, fnw=False)
    return LearnerModel(model_args(variant, data, arch), loss, budget)


@dataclass
class RunRecord:
    """The outcome of one (data set, variant, seed) run, as stored in results.json."""

    dataset: str
    variant: str  # Variant.label
    model: str
    weighting: str
    target: str
    esmm: bool
    seed: int
    metrics: dict[str, float] = field(default_factory=dict)  # test metrics
    best_epoch: int = 0
    epochs: int = 0
    seconds: float = 0.0


def run_variant(
    variant: Variant,
    data: Dataset,
    arch: Architecture,
    budget: Budget,
    seed: int,
    on_epoch: Callable[[int, float], None] | None = None,
) -> RunRecord:
    """Train one variant on one data set with one seed; return its test metrics."""
    trainable = build_trainable(variant, data, arch, budget, seed)
    result = fit(trainable, data, budget, seed, on_epoch)
    metrics = task_metrics(data.tasks, result.test_preds, data.test)
    metrics.update(truth_metrics(result.test_preds, data.test))
    logger.debug(
        "run dataset=%s variant=%s seed=%d best_epoch=%d seconds=%.1f metrics=%s",
        data.name,
        variant.label,
        seed,
        result.best_epoch,
        result.seconds,
        metrics,
    )
    return RunRecord(
        dataset=data.name,
        variant=variant.label,
        model=variant.model,
        weighting=variant.weighting,
        target=variant.target,
        esmm=variant.esmm,
        seed=seed,
        metrics=metrics,
        best_epoch=result.best_epoch,
        epochs=budget.epochs,
        seconds=result.seconds,
    )
