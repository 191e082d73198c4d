"""RankingModel: input encoder + multi-task backbone + towers (+ ESMM), rebuilt from JSON args.

A snapshot is a safetensors `state_dict` plus `model.model_args` (plain JSON). The scorer
rebuilds the model with `load_model(model_args, state_dict)`, without any training code.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from learner.errors import ConfigError
from learner.features import FeatureSpec, InputEncoder, default_feature_spec
from learner.models.base import Backbone, check_hidden, config_from_dict, config_to_dict
from learner.models.cgc import CGC, CGCConfig
from learner.models.esmm import esmm_ctcvr_logit, esmm_ctcvr_prob
from learner.models.mmoe import MMoE, MMoEConfig, OMoE
from learner.models.ple import PLE, PLEConfig
from learner.models.shared_bottom import SharedBottom, SharedBottomConfig
from learner.models.single import SingleTask, SingleTaskConfig
from learner.models.towers import TaskTower

__all__ = [
    "ARCHS",
    "COUNT_LOSSES",
    "DEFAULT_TASKS",
    "FORMAT_VERSION",
    "TASK_KINDS",
    "ModelArgs",
    "RankingModel",
    "build_model",
    "load_model",
]

FORMAT_VERSION = 1  # bump when model_args or the state_dict layout changes incompatibly
TASK_KINDS = ("binary", "count", "regression")
COUNT_LOSSES = ("log1p_mse", "poisson")
# Tasks of DESIGN.md section 1; kinds pick the loss and the prediction scale.
DEFAULT_TASKS: dict[str, str] = {
    "ctr": "binary",
    "cvr": "binary",
    "ctcvr": "binary",
    "ysl": "count",
}
_TASK_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_POISSON_MAX_LOG_RATE = 20.0  # exp(20) ~ 5e8 follow-on clicks: far past any real count

_BackboneFactory = Callable[[Any, int, tuple[str, ...]], Backbone]
ARCHS: dict[str, tuple[type[Any], _BackboneFactory]] = {
    "single": (SingleTaskConfig, SingleTask),
    "shared_bottom": (SharedBottomConfig, SharedBottom),
    "omoe": (MMoEConfig, OMoE),
    "mmoe": (MMoEConfig, MMoE),
    "cgc": (CGCConfig, CGC),
    "ple": (PLEConfig, PLE),
}


@dataclass(frozen=True)
class ModelArgs:
    """Everything needed to rebuild a `RankingModel`; `to_dict()` is its JSON form."""

    arch: str = "ple"  # one of ARCHS
    config: dict[str, Any] = field(default_factory=dict)  # the arch's config; missing = default
    tasks: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_TASKS))  # name -> kind
    esmm: bool = True  # ctcvr = p_ctr * p_cvr instead of its own head
    count_loss: str = "log1p_mse"  # count tasks: MSE on log1p(y), or "poisson" NLL
    tower_hidden: tuple[int, ...] = (32,)  # task tower MLP sizes (may be empty)
    features: FeatureSpec = field(default_factory=default_feature_spec)
    missing_indicator: bool = True  # append a 0/1 "missing" column per dense feature
    dense_clip: float = 10.0  # clip normalised dense values to +-dense_clip
    norm_max_count: float | None = None  # cap on the running stats' memory (tracks drift)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"unknown arch {self.arch!r}; known: {sorted(ARCHS)}")
        self._check_tasks()
        if self.count_loss not in COUNT_LOSSES:
            raise ConfigError(f"count_loss must be one of {COUNT_LOSSES}, got {self.count_loss!r}")
        check_hidden("tower_hidden", self.tower_hidden, allow_empty=True)
        if not (self.features.categorical or self.features.dense):
            raise ConfigError("the feature spec has no categorical and no dense feature")
        if not self.dense_clip > 0:
            raise ConfigError(f"dense_clip must be > 0, got {self.dense_clip!r}")
        # Validate the arch config now, so a bad snapshot fails before any module is built.
        self.arch_config()

    def _check_tasks(self) -> None:
        if not isinstance(self.tasks, Mapping) or not self.tasks:
            raise ConfigError(f"tasks must be a non-empty mapping name -> kind, got {self.tasks!r}")
        for name, kind in self.tasks.items():
            if not isinstance(name, str) or not _TASK_NAME.match(name):
                raise ConfigError(f"task name {name!r} must match {_TASK_NAME.pattern}")
            if kind not in TASK_KINDS:
                raise ConfigError(f"task {name!r}: kind must be one of {TASK_KINDS}, got {kind!r}")
        if self.esmm and any(self.tasks.get(t) != "binary" for t in ("ctr", "cvr", "ctcvr")):
            raise ConfigError(
                f"esmm needs binary tasks ctr, cvr and ctcvr; got tasks {dict(self.tasks)}"
            )

    def arch_config(self) -> Any:
        """Return the arch's config dataclass, defaults filled in."""
        config_cls, _ = ARCHS[self.arch]
        return config_from_dict(config_cls, self.config)

    def to_dict(self) -> dict[str, Any]:
        """Return the args as a plain JSON-serialisable dict, every default made explicit."""
        return {
            "format_version": FORMAT_VERSION,
            "arch": self.arch,
            "config": config_to_dict(self.arch_config()),
            "tasks": dict(self.tasks),
            "esmm": self.esmm,
            "count_loss": self.count_loss,
            "tower_hidden": list(self.tower_hidden),
            "features": self.features.to_dict(),
            "missing_indicator": self.missing_indicator,
            "dense_clip": self.dense_clip,
            "norm_max_count": self.norm_max_count,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelArgs:
        """Parse `to_dict()` output (or a partial dict of overrides onto the defaults)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"model_args must be a mapping, got {type(data).__name__}")
        kwargs = dict(data)
        version = kwargs.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ConfigError(
                f"model_args format_version {version!r} is not supported by this code "
                f"(format_version {FORMAT_VERSION})"
            )
        if "features" in kwargs:
            kwargs["features"] = FeatureSpec.from_dict(kwargs["features"])
        if "tower_hidden" in kwargs:
            kwargs["tower_hidden"] = tuple(kwargs["tower_hidden"])
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"bad model_args: {exc}") from exc


class RankingModel(nn.Module):
    """InputEncoder -> backbone -> one TaskTower per head task (+ ESMM ctcvr composition).

    With ESMM, the heads are every task but ctcvr, and ctcvr is composed from ctr and cvr.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self._model_args = args.to_dict()
        self.tasks = tuple(args.tasks)
        self.task_kinds = dict(args.tasks)
        self.esmm = args.esmm
        self.count_loss = args.count_loss
        self.head_tasks = tuple(t for t in self.tasks if not (args.esmm and t == "ctcvr"))
        self.encoder = InputEncoder(
            args.features, args.missing_indicator, args.dense_clip, args.norm_max_count
        )
        _, factory = ARCHS[args.arch]
        self.backbone = factory(args.arch_config(), self.encoder.out_dim, self.head_tasks)
        self.towers = nn.ModuleDict(
            {t: TaskTower(self.backbone.out_dim, args.tower_hidden) for t in self.head_tasks}
        )

    @property
    def model_args(self) -> dict[str, Any]:
        """Return the JSON-serialisable args that rebuild this model (a fresh copy)."""
        return copy.deepcopy(self._model_args)

    def forward(self, cat: Tensor, dense: Tensor) -> dict[str, Tensor]:
        """Return raw outputs {task: (B,)}.

        binary: logits (ESMM ctcvr: the logit of p_ctr * p_cvr, computed stably; losses use
        the ctr and cvr logits directly); count: log1p(y) prediction for "log1p_mse", log-rate
        for "poisson"; regression: the value.
        """
        x = self.encoder(cat, dense)  # (B, D_in)
        reps = self.backbone(x)  # task -> (B, H)
        # float32 heads: under bf16 autocast, ESMM and the losses still need the precision.
        out = {t: self.towers[t](reps[t]).float() for t in self.head_tasks}  # task -> (B,)
        if self.esmm:
            out["ctcvr"] = esmm_ctcvr_logit(out["ctr"], out["cvr"])
        return {t: out[t] for t in self.tasks}

    def to_predictions(self, outputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Map `forward` outputs to probabilities (binary) and values on the label scale."""
        preds: dict[str, Tensor] = {}
        for task, kind in self.task_kinds.items():
            raw = outputs[task]  # (B,)
            if kind == "binary":
                preds[task] = torch.sigmoid(raw)
            elif kind == "count" and self.count_loss == "poisson":
                preds[task] = torch.exp(raw.clamp(max=_POISSON_MAX_LOG_RATE))
            elif kind == "count":
                preds[task] = torch.expm1(raw).clamp(min=0.0)
            else:
                preds[task] = raw
        if self.esmm:
            preds["ctcvr"] = esmm_ctcvr_prob(outputs["ctr"], outputs["cvr"])
        return preds

    @torch.no_grad()
    def predict(self, cat: Tensor, dense: Tensor) -> dict[str, Tensor]:
        """Return predictions {task: (B,)} without gradients.

        Call `model.eval()` first: in train mode the forward updates the dense
        normalisation statistics and applies dropout.
        """
        return self.to_predictions(self(cat, dense))

    def gate_weights(self) -> dict[str, Tensor]:
        """Return the last forward's gate weights {"level{j}/{task|shared}": (B, n_experts)}."""
        return self.backbone.gate_weights()


def build_model(model_args: Mapping[str, Any]) -> RankingModel:
    """Build a freshly initialised model from (possibly partial) JSON model args.

    Examples
    --------
    >>> model = build_model({"arch": "mmoe", "config": {"n_experts": 3}})
    >>> model.model_args["config"]
    {'n_experts': 3, 'expert_hidden': [64], 'dropout': 0.0}
    """
    return RankingModel(ModelArgs.from_dict(model_args))


def load_model(model_args: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> RankingModel:
    """Rebuild a snapshot's model in eval mode; every tensor must match (strict load)."""
    model = build_model(model_args)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
