"""The offline training loop: a fixed budget of epochs, model selection on validation.

One loop trains every model, ours and the DeepCTR-Torch baselines alike, so the budget is
the same by construction: same batches in the same order (per seed), same number of steps,
the best epoch picked by the same validation score. Our models are the online learner's own
(`learner.models.build_model`, `learner.losses.MultiTaskLoss`), optimised as the learner
optimises them (`Learner._make_optimizers` / `train_step`): Adam on dense parameters,
SparseAdam on sparse embedding tables at their own learning rate, the dense gradient norm
clipped, learning rates and clip taken from `LearnerSettings`' defaults.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from evaluation.datasets import Dataset, Split
from evaluation.metrics import selection_score
from learner.losses import LossConfig, LossResult, MultiTaskLoss, Targets
from learner.models import RankingModel, build_model
from learner.optim import clipped_params
from learner.optim import make_optimizers as learner_optimizers
from learner.settings import LearnerSettings

__all__ = [
    "Batch",
    "Budget",
    "FitResult",
    "LearnerModel",
    "Trainable",
    "fit",
    "learner_default",
    "predict_split",
]

logger = logging.getLogger(__name__)

Predictions = dict[str, NDArray[np.float64]]


def learner_default(name: str) -> Any:
    """Return the default of a `LearnerSettings` field (what the online learner trains with)."""
    for f in dataclasses.fields(LearnerSettings):
        if f.name == name:
            return f.default
    raise KeyError(f"LearnerSettings has no field {name!r}")


@dataclass(frozen=True)
class Budget:
    """The training budget every model of a comparison gets."""

    epochs: int = 10  # passes over the training split; the best one (validation) is kept
    batch_size: int = 1024  # rows per optimizer step
    lr: float = field(default_factory=lambda: float(learner_default("lr")))  # dense Adam
    embedding_lr: float = field(default_factory=lambda: float(learner_default("embedding_lr")))
    grad_clip: float = field(default_factory=lambda: float(learner_default("grad_clip")))
    eval_batch: int = 16_384  # rows per forward when predicting (no gradients)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch < 1:
            raise ValueError(f"epochs, batch_size and eval_batch must be >= 1, got {self}")
        if not (self.lr > 0 and self.embedding_lr > 0 and self.grad_clip >= 0):
            raise ValueError(f"learning rates must be > 0 and grad_clip >= 0, got {self}")


@dataclass(frozen=True)
class Batch:
    """One training batch as tensors."""

    cat: Tensor  # (B, Fc) int64
    dense: Tensor  # (B, Fd) float32, NaN = missing
    labels: dict[str, Tensor]  # task -> (B,)
    masks: dict[str, Tensor]  # task -> (B,), only for tasks with a sample-space mask


class Trainable(Protocol):
    """A model plus its loss and optimizers, as the loop drives it."""

    @property
    def module(self) -> nn.Module:
        """The model: train()/eval() and the state saved for the best epoch."""
        ...

    @property
    def optimizers(self) -> Sequence[torch.optim.Optimizer]:
        """Stepped after every backward pass."""
        ...

    @property
    def clip_params(self) -> Sequence[Tensor]:
        """Parameters whose gradient norm is clipped."""
        ...

    def loss(self, batch: Batch, step: int) -> Tensor:
        """Return the scalar training loss of a batch (with graph)."""
        ...

    def predict(self, cat: Tensor, dense: Tensor) -> dict[str, Tensor]:
        """Return per-task predictions (B,): probabilities, or values on the label scale."""
        ...


def make_optimizers(
    model: nn.Module, extra: Sequence[nn.Parameter], budget: Budget
) -> tuple[list[torch.optim.Optimizer], list[nn.Parameter]]:
    """Return the learner's optimizers (`learner.optim`) and the parameters to clip."""
    optimizers = learner_optimizers(model, extra, lr=budget.lr, embedding_lr=budget.embedding_lr)
    return list(optimizers.values()), clipped_params(optimizers)


class LearnerModel:
    """A `learner.models.RankingModel` with its `MultiTaskLoss`, trained as the learner does."""

    def __init__(
        self, model_args: Mapping[str, Any], loss_config: LossConfig, budget: Budget
    ) -> None:
        self.model: RankingModel = build_model(model_args)
        self.loss_fn = MultiTaskLoss.for_model(self.model, loss_config)
        self.module = self.model
        self.optimizers, self.clip_params = make_optimizers(
            self.model, list(self.loss_fn.parameters()), budget
        )

    def loss(self, batch: Batch, step: int) -> Tensor:
        """Return the weighted multi-task loss of a batch (masked per task, PLE eq. 9)."""
        outputs = self.model(batch.cat, batch.dense)  # task -> (B,)
        targets = Targets(labels=batch.labels, masks=batch.masks)
        result: LossResult = self.loss_fn(outputs, targets, step)
        return result.total

    def predict(self, cat: Tensor, dense: Tensor) -> dict[str, Tensor]:
        """Return probabilities (binary) and label-scale values, per task (B,)."""
        return self.model.predict(cat, dense)


@dataclass
class FitResult:
    """What one training run produced: the selected epoch and its test predictions."""

    best_epoch: int  # 1-based epoch whose weights were kept
    valid_score: float  # its selection score on validation
    valid_scores: list[float]  # selection score after every epoch
    test_preds: Predictions  # task -> (N_test,) from the kept weights
    seconds: float  # wall time of training and validation
    steps: int  # optimizer steps taken


def _tensors(split: Split, tasks: Sequence[str]) -> Batch:
    return Batch(
        cat=torch.from_numpy(split.cat),
        dense=torch.from_numpy(split.dense),
        labels={t: torch.from_numpy(split.labels[t]) for t in tasks},
        masks={t: torch.from_numpy(m) for t, m in split.masks.items() if t in tasks},
    )


def _rows(batch: Batch, idx: Tensor) -> Batch:
    return Batch(
        cat=batch.cat[idx],
        dense=batch.dense[idx],
        labels={t: y[idx] for t, y in batch.labels.items()},
        masks={t: m[idx] for t, m in batch.masks.items()},
    )


@torch.no_grad()
def predict_split(trainable: Trainable, split: Split, eval_batch: int = 16_384) -> Predictions:
    """Return the model's predictions {task: (N,)} over a split, in eval mode."""
    trainable.module.eval()
    cat, dense = torch.from_numpy(split.cat), torch.from_numpy(split.dense)
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, len(split), eval_batch):
        preds = trainable.predict(
            cat[start : start + eval_batch], dense[start : start + eval_batch]
        )
        for task, p in preds.items():
            parts.setdefault(task, []).append(p.float())
    return {t: torch.cat(ps).to(torch.float64).numpy() for t, ps in parts.items()}


def _train_epoch(
    trainable: Trainable, data: Batch, n: int, budget: Budget, gen: torch.Generator, step: int
) -> int:
    """One pass over the training rows in a seeded order; return the step count after it."""
    trainable.module.train()
    order = torch.randperm(n, generator=gen)  # (N,)
    for start in range(0, n, budget.batch_size):
        batch = _rows(data, order[start : start + budget.batch_size])
        loss = trainable.loss(batch, step)
        torch.autograd.backward(loss)  # Tensor.backward is untyped in torch
        if budget.grad_clip > 0:
            nn.utils.clip_grad_norm_(trainable.clip_params, budget.grad_clip)
        for optimizer in trainable.optimizers:
            optimizer.step()
        for optimizer in trainable.optimizers:
            optimizer.zero_grad(set_to_none=True)
        step += 1
    return step


def fit(
    trainable: Trainable,
    data: Dataset,
    budget: Budget,
    seed: int,
    on_epoch: Callable[[int, float], None] | None = None,
) -> FitResult:
    """Train for `budget.epochs`, keep the epoch with the best validation score, predict test.

    `seed` fixes the batch order; seed the model's initialisation before building it.
    `on_epoch(epoch, valid_score)` is called after each epoch (progress bars).
    """
    started = time.perf_counter()
    tasks = list(data.tasks)
    train = _tensors(data.train, tasks)
    gen = torch.Generator().manual_seed(seed)
    best_key, best_score, best_epoch, best_state = -math.inf, math.nan, 0, None
    scores: list[float] = []
    step = 0
    for epoch in range(1, budget.epochs + 1):
        step = _train_epoch(trainable, train, len(data.train), budget, gen, step)
        preds = predict_split(trainable, data.valid, budget.eval_batch)
        score = selection_score(data.tasks, preds, data.valid)
        scores.append(score)
        # NaN (a diverged model) never wins; the first epoch is kept if none is finite.
        key = -math.inf if math.isnan(score) else score
        if best_state is None or key > best_key:
            best_key, best_score, best_epoch = key, score, epoch
            best_state = copy.deepcopy(trainable.module.state_dict())
        if on_epoch is not None:
            on_epoch(epoch, score)
    if best_state is not None:
        trainable.module.load_state_dict(best_state)
    test_preds = predict_split(trainable, data.test, budget.eval_batch)
    return FitResult(
        best_epoch=best_epoch,
        valid_score=best_score,
        valid_scores=scores,
        test_preds=test_preds,
        seconds=time.perf_counter() - started,
        steps=step,
    )
