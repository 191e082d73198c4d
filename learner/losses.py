"""Masked multi-task losses, task weighting (static, UWL, decay) and fake-negative weighting.

Each task's loss is averaged over its own sample space (PLE paper eq. 9):
``L_k = sum_i m_ik * w_i * f_ik * loss_ik / max(1, sum_i m_ik)``, with row weights w_i and
fake-negative weights f_ik (Ktena et al. 2019) on rows flagged for it. A task with no row in
its sample space contributes exactly zero loss and zero gradient, its UWL term included.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812  # the usual torch alias
from torch import Tensor, nn

from learner.errors import ConfigError
from learner.models.esmm import esmm_ctcvr_bce
from learner.models.ranking import COUNT_LOSSES, TASK_KINDS, RankingModel

__all__ = [
    "WEIGHTINGS",
    "LossConfig",
    "LossResult",
    "LossWeighting",
    "MultiTaskLoss",
    "Targets",
    "build_targets",
    "fnw_weights",
    "masked_task_loss",
    "row_losses",
]

WEIGHTINGS = ("static", "uwl", "decay")
_MAX_LOG_RATE = 20.0  # Poisson log-rate clamp: keeps exp() finite on a diverging model


@dataclass
class Targets:
    """Labels and sample-space masks per task, each a float tensor (B,), for one batch.

    `weights` (B,) scales each row (default 1); rows with `fnw` (B,) > 0 get fake-negative
    weighting on binary tasks. A task missing from `masks` counts every row.
    """

    labels: dict[str, Tensor]  # task -> (B,) label: 0/1, a count, or a value
    masks: dict[str, Tensor] = field(default_factory=dict)  # task -> (B,) 1 = in sample space
    weights: Tensor | None = None  # (B,) per-row weight
    fnw: Tensor | None = None  # (B,) 1 = fake-negative-weight this row (early / correction)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Targets:
        """Return a copy with every tensor moved to `device`."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Targets(
            labels={k: v.to(device, non_blocking=non_blocking) for k, v in self.labels.items()},
            masks={k: v.to(device, non_blocking=non_blocking) for k, v in self.masks.items()},
            weights=move(self.weights),
            fnw=move(self.fnw),
        )


def build_targets(
    click: Tensor,
    conversion: Tensor,
    ysl: Tensor,
    *,
    ysl_space: str = "clicked",
    weights: Tensor | None = None,
    fnw: Tensor | None = None,
) -> Targets:
    """Return the default tasks' labels and masks from a batch of sample labels (each (B,)).

    ctr = click, cvr = conversion on clicked rows, ctcvr = click * conversion on all rows,
    ysl = the follow-on count on clicked rows (`ysl_space="clicked"`) or all rows ("all").
    """
    if ysl_space not in ("clicked", "all"):
        raise ValueError(f"ysl_space must be 'clicked' or 'all', got {ysl_space!r}")
    click, conversion, ysl = click.float(), conversion.float(), ysl.float()
    ones = torch.ones_like(click)
    return Targets(
        labels={"ctr": click, "cvr": conversion, "ctcvr": click * conversion, "ysl": ysl},
        masks={
            "ctr": ones,
            "cvr": click,
            "ctcvr": ones,
            "ysl": click if ysl_space == "clicked" else ones,
        },
        weights=weights,
        fnw=fnw,
    )


def fnw_weights(prob: Tensor, label: Tensor) -> Tensor:
    """Return fake-negative weights (B,): positives (1 + p), negatives (1 - p)(1 + p).

    `prob` is detached here: the weights are importance weights, not a path for gradients.
    """
    p = prob.detach()
    return label * (1.0 + p) + (1.0 - label) * (1.0 - p) * (1.0 + p)


def row_losses(raw: Tensor, label: Tensor, kind: str, count_loss: str = "log1p_mse") -> Tensor:
    """Return the per-row loss (B,) of one task from its raw output and a clean label."""
    if kind == "binary":
        return F.binary_cross_entropy_with_logits(raw, label, reduction="none")
    if kind == "count" and count_loss == "poisson":
        # NLL of Poisson(exp(raw)) up to the label-only term log(y!).
        return torch.exp(raw.clamp(max=_MAX_LOG_RATE)) - label * raw
    if kind == "count":
        return (raw - torch.log1p(label)).square()
    return (raw - label).square()


def masked_task_loss(row_loss: Tensor, mask: Tensor, weight: Tensor | None = None) -> Tensor:
    """Return ``sum(m * w * loss) / max(1, sum(m))`` as a scalar (PLE eq. 9)."""
    scaled = row_loss * mask if weight is None else row_loss * mask * weight  # (B,)
    # where(), not only the product: a row outside the space must not leak inf/NaN.
    scaled = torch.where(mask > 0, scaled, 0.0)
    return scaled.sum() / mask.sum().clamp(min=1.0)


def _clean_label(label: Tensor, mask: Tensor, kind: str) -> Tensor:
    """Zero labels outside the sample space and make the rest valid for `kind`.

    Labels of masked-out rows may be garbage (NaN, negative); left alone they would turn
    the zero gradient of those rows into NaN in the backward pass.
    """
    label = torch.where(mask > 0, torch.nan_to_num(label.float(), nan=0.0), 0.0)
    if kind == "binary":
        return label.clamp(0.0, 1.0)
    if kind == "count":
        return label.clamp(min=0.0)
    return label


@dataclass(frozen=True)
class LossConfig:
    """How task losses are weighted and which rows get fake-negative weighting."""

    weighting: str = "uwl"  # "static" | "uwl" | "decay"
    weights: dict[str, float] = field(default_factory=dict)  # static / decay w_k0; missing 1.0
    uwl_c: dict[str, float] = field(default_factory=dict)  # UWL c_k; missing: by task kind
    uwl_c_binary: float = 1.0  # default c_k of binary tasks
    uwl_c_regression: float = 2.0  # default c_k of count and regression tasks (DESIGN.md 1)
    decay_gamma: float = 0.9999  # decay: w_k(t) = w_k0 * gamma_k^t, t = training step
    decay_gammas: dict[str, float] = field(default_factory=dict)  # per-task gamma overrides
    fnw: bool = True  # apply fake-negative weights to rows flagged `fnw`
    esmm_cvr_loss: bool = False  # with ESMM, also train cvr directly on clicked rows

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        gammas = [self.decay_gamma, *self.decay_gammas.values()]
        if any(not 0.0 < g <= 1.0 for g in gammas):
            raise ConfigError(f"decay gammas must be in (0, 1], got {gammas!r}")

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a plain JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LossConfig:
        """Build a config from a (possibly partial) dict, rejecting unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown LossConfig keys {sorted(unknown)}")
        return cls(**dict(data))


class LossWeighting(nn.Module):
    """Combine per-task losses into one scalar: static, UWL or decayed weights.

    - static: ``sum_k w_k * L_k``
    - uwl:    ``sum_k exp(-s_k) * c_k * L_k + s_k``, s_k = log sigma_k^2 learned (Kendall et al.)
    - decay:  ``sum_k w_k0 * gamma_k^t * L_k`` (PLE eq. 10), t = the step passed in.

    Tasks with no row in their sample space (count 0) are left out entirely.
    """

    w0: Tensor
    c: Tensor
    gamma: Tensor
    log_vars: nn.Parameter | None

    def __init__(
        self,
        tasks: Sequence[str],
        mode: str = "static",
        weights: Mapping[str, float] | None = None,
        uwl_c: Mapping[str, float] | None = None,
        gammas: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        if mode not in WEIGHTINGS:
            raise ConfigError(f"weighting must be one of {WEIGHTINGS}, got {mode!r}")
        self.tasks = tuple(tasks)
        self.mode = mode

        def vector(values: Mapping[str, float] | None) -> Tensor:
            values = values or {}
            return torch.tensor([float(values.get(t, 1.0)) for t in self.tasks])

        self.register_buffer("w0", vector(weights))
        self.register_buffer("c", vector(uwl_c))
        self.register_buffer("gamma", vector(gammas))
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks))) if mode == "uwl" else None

    def multipliers(self, step: int = 0) -> Tensor:
        """Return the factor (K,) each task loss is multiplied by at `step`."""
        if self.log_vars is not None:
            return torch.exp(-self.log_vars) * self.c
        if self.mode == "decay":
            return self.w0 * self.gamma.pow(float(step))
        return self.w0

    def forward(
        self, losses: Mapping[str, Tensor], counts: Mapping[str, Tensor], step: int = 0
    ) -> Tensor:
        """Return the weighted total loss (scalar) of per-task losses and sample counts."""
        stacked = torch.stack([losses[t] for t in self.tasks])  # (K,)
        present = torch.stack([counts[t] for t in self.tasks]).gt(0).to(stacked.dtype)  # (K,)
        terms = self.multipliers(step) * stacked  # (K,)
        if self.log_vars is not None:
            terms = terms + self.log_vars
        # Multiply, not index: absent tasks then get an exact zero gradient, s_k included.
        return (present * terms).sum()


@dataclass
class LossResult:
    """The total loss to backpropagate plus detached per-task scalars for logging.

    The scalars stay tensors so a training step on CUDA never waits for the device; call
    `as_floats()` only when logging.
    """

    total: Tensor  # scalar, with graph
    per_task: dict[str, Tensor]  # L_k, unweighted, detached
    counts: dict[str, Tensor]  # sum of each task's mask
    multipliers: dict[str, Tensor]  # factor applied to each L_k at this step

    def as_floats(self) -> dict[str, float]:
        """Return {"loss", "loss.{task}", "n.{task}", "w.{task}"} as floats (one device sync)."""
        names = ["loss"]
        values = [self.total.detach()]
        for prefix, part in (("loss", self.per_task), ("n", self.counts), ("w", self.multipliers)):
            names += [f"{prefix}.{t}" for t in part]
            values += list(part.values())
        return dict(zip(names, torch.stack(values).tolist(), strict=True))


class MultiTaskLoss(nn.Module):
    """Masked per-task losses + FNW + weighting, matching a `RankingModel`'s tasks and heads.

    With ESMM, ctcvr's BCE is computed from the ctr and cvr logits in log space and cvr is
    trained only through it unless `esmm_cvr_loss` is set.
    """

    def __init__(
        self,
        task_kinds: Mapping[str, str],
        config: LossConfig | None = None,
        esmm: bool = False,
        count_loss: str = "log1p_mse",
    ) -> None:
        super().__init__()
        self.config = config or LossConfig()
        self.task_kinds = dict(task_kinds)
        if any(kind not in TASK_KINDS for kind in self.task_kinds.values()):
            raise ConfigError(f"task kinds must be in {TASK_KINDS}, got {self.task_kinds}")
        if count_loss not in COUNT_LOSSES:
            raise ConfigError(f"count_loss must be one of {COUNT_LOSSES}, got {count_loss!r}")
        self.esmm = esmm
        self.count_loss = count_loss
        skip_cvr = esmm and not self.config.esmm_cvr_loss
        self.trained_tasks = tuple(t for t in self.task_kinds if not (skip_cvr and t == "cvr"))
        self.weighting = LossWeighting(
            self.trained_tasks,
            self.config.weighting,
            weights=self.config.weights,
            uwl_c={t: self._uwl_c(t) for t in self.trained_tasks},
            gammas={
                t: self.config.decay_gammas.get(t, self.config.decay_gamma)
                for t in self.trained_tasks
            },
        )

    @classmethod
    def for_model(cls, model: RankingModel, config: LossConfig | None = None) -> MultiTaskLoss:
        """Return the loss matching `model`'s tasks, ESMM flag and count loss."""
        return cls(model.task_kinds, config, esmm=model.esmm, count_loss=model.count_loss)

    def _uwl_c(self, task: str) -> float:
        if task in self.config.uwl_c:
            return float(self.config.uwl_c[task])
        if self.task_kinds[task] == "binary":
            return self.config.uwl_c_binary
        return self.config.uwl_c_regression

    def _mask(self, task: str, like: Tensor, targets: Targets) -> Tensor:
        mask = targets.masks.get(task)
        return torch.ones_like(like) if mask is None else mask.to(like.dtype)

    def _task_loss(
        self, task: str, outputs: Mapping[str, Tensor], targets: Targets
    ) -> tuple[Tensor, Tensor]:
        """Return task `task`'s masked mean loss L_k and its sample count (both scalars)."""
        kind = self.task_kinds[task]
        raw = outputs[task].float()  # (B,); float32 even under bf16 autocast
        mask = self._mask(task, raw, targets)  # (B,)
        label = _clean_label(targets.labels[task], mask, kind)  # (B,)
        if self.esmm and task == "ctcvr":
            row = esmm_ctcvr_bce(outputs["ctr"].float(), outputs["cvr"].float(), label)
        else:
            row = row_losses(raw, label, kind, self.count_loss)  # (B,)
        weight = targets.weights
        if self.config.fnw and targets.fnw is not None and kind == "binary":
            # sigmoid(raw) is p_ctr * p_cvr for the ESMM ctcvr logit too.
            fnw = torch.where(targets.fnw > 0, fnw_weights(torch.sigmoid(raw), label), 1.0)
            weight = fnw if weight is None else fnw * weight  # (B,)
        return masked_task_loss(row, mask, weight), mask.sum()

    def forward(self, outputs: Mapping[str, Tensor], targets: Targets, step: int = 0) -> LossResult:
        """Return the weighted total and per-task losses for one batch."""
        missing = [t for t in self.trained_tasks if t not in targets.labels]
        if missing:
            raise ValueError(
                f"targets lack labels for tasks {missing}; have {sorted(targets.labels)}"
            )
        losses: dict[str, Tensor] = {}
        counts: dict[str, Tensor] = {}
        for task in self.trained_tasks:
            losses[task], counts[task] = self._task_loss(task, outputs, targets)
        total = self.weighting(losses, counts, step)
        multipliers = self.weighting.multipliers(step).detach()  # (K,)
        return LossResult(
            total=total,
            per_task={t: v.detach() for t, v in losses.items()},
            counts=counts,
            multipliers=dict(zip(self.trained_tasks, multipliers.unbind(), strict=True)),
        )
