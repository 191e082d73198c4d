"""DeepCTR-Torch's MMOE and PLE, an implementation not written here, as baselines.

They train in the same loop as our models (`evaluation.train.fit`): same splits, batches,
epochs, selection and optimizer family (Adam at the learner's learning rates, embeddings at
`embedding_lr`). What stays DeepCTR's: the model code, its initialisation (normal, std 1e-4),
its loss form (BCE on the sigmoid output, MSE for regression) and its L2 regularisation
(`get_regularization_loss`, defaults). Dense inputs are standardised with training-split
statistics here, since DeepCTR has no normaliser of its own (ours has `RunningNorm`).

`deepctr_torch` is imported lazily, only when a baseline is built: its package import
starts a thread that asks PyPI for a newer version and prints when offline. That check is
replaced by a no-op before the import (`import_deepctr`).

Known difference: DeepCTR-Torch 0.3.0's PLE builds `specific_expert_num` shared experts per
level instead of `shared_expert_num`, so `shared_expert_num > specific_expert_num` fails with
an IndexError in forward; the comparison therefore uses equal counts.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812  # the usual torch alias
from torch import Tensor, nn

from evaluation.datasets import Dataset
from evaluation.train import Batch, Budget

__all__ = ["DEEPCTR_ARCHS", "DeepCTRModel", "import_deepctr"]

DEEPCTR_ARCHS = ("mmoe", "ple")


def import_deepctr() -> Any:
    """Import deepctr_torch without its network version check; return the package."""
    if "deepctr_torch" not in sys.modules:
        # The package's __init__ does `from .utils import check_version` and calls it; a
        # stand-in `deepctr_torch.utils` (that module holds nothing else) makes it a no-op.
        stub = types.ModuleType("deepctr_torch.utils")
        stub.check_version = lambda version: None  # type: ignore[attr-defined]  # stub module
        sys.modules.setdefault("deepctr_torch.utils", stub)
    import deepctr_torch
    import deepctr_torch.models.multitask

    return deepctr_torch


class DeepCTRModel:
    """A DeepCTR-Torch multi-task model behind the harness's `Trainable` interface.

    Parameters
    ----------
    arch
        "mmoe" or "ple".
    data
        The data set: its feature spec gives the feature columns (same embedding sizes as
        ours), its training split the dense standardisation, its tasks the heads.
    config
        DeepCTR keyword arguments for the architecture (expert counts, hidden units).
    """

    def __init__(
        self, arch: str, data: Dataset, config: dict[str, Any], budget: Budget, seed: int
    ) -> None:
        if arch not in DEEPCTR_ARCHS:
            raise ValueError(f"DeepCTR arch must be one of {DEEPCTR_ARCHS}, got {arch!r}")
        kinds = set(data.tasks.values()) - {"binary", "regression"}
        if kinds:
            raise ValueError(f"DeepCTR heads are binary or regression only, got {sorted(kinds)}")
        deepctr = import_deepctr()
        from deepctr_torch.inputs import DenseFeat, SparseFeat

        columns = [SparseFeat(f.name, f.buckets, f.dim) for f in data.spec.categorical]
        columns += [DenseFeat(name, 1) for name in data.spec.dense]
        cls = deepctr.models.multitask.MMOE if arch == "mmoe" else deepctr.models.multitask.PLE
        self.tasks = list(data.tasks)
        self.kinds = [data.tasks[t] for t in self.tasks]
        # deepctr_torch is untyped: keep the model as Any, expose it as a Module to the loop
        self._net: Any = cls(
            columns,
            task_types=tuple(self.kinds),
            task_names=tuple(self.tasks),
            seed=seed,
            device="cpu",
            **config,
        )
        self.module: nn.Module = self._net
        dense = data.train.dense.astype(np.float64)  # (N, Fd)
        mean = np.nan_to_num(np.nanmean(dense, axis=0)) if dense.size else np.zeros(0)
        std = np.nan_to_num(np.nanstd(dense, axis=0)) if dense.size else np.zeros(0)
        self.mean = torch.tensor(mean, dtype=torch.float32)  # (Fd,)
        self.scale = torch.tensor(1.0 / np.maximum(std, 1e-6), dtype=torch.float32)  # (Fd,)
        self.optimizers, self.clip_params = self._optimizers(budget)

    def _optimizers(self, budget: Budget) -> tuple[list[torch.optim.Optimizer], list[nn.Parameter]]:
        tables = {id(m.weight) for m in self.module.modules() if isinstance(m, nn.Embedding)}
        params = list(self.module.parameters())
        dense = [p for p in params if id(p) not in tables]
        groups: list[dict[str, Any]] = [{"params": dense}]
        embeddings = [p for p in params if id(p) in tables]
        if embeddings:
            groups.append({"params": embeddings, "lr": budget.embedding_lr})
        return [torch.optim.Adam(groups, lr=budget.lr)], dense

    def _inputs(self, cat: Tensor, dense: Tensor) -> Tensor:
        """DeepCTR's input matrix (B, Fc + Fd): ids as floats, then standardised dense."""
        z = torch.nan_to_num((dense - self.mean) * self.scale, nan=0.0)  # (B, Fd)
        return torch.cat([cat.float(), z], dim=1)

    def _outputs(self, cat: Tensor, dense: Tensor) -> Tensor:
        out: Tensor = self.module(self._inputs(cat, dense))  # (B, T) probabilities / values
        return out

    def loss(self, batch: Batch, step: int) -> Tensor:
        """Return the sum of per-task mean losses (over each task's mask) plus DeepCTR's L2."""
        out = self._outputs(batch.cat, batch.dense)  # (B, T)
        total: Tensor = self._net.get_regularization_loss().sum()  # (1,) -> scalar
        for k, (task, kind) in enumerate(zip(self.tasks, self.kinds, strict=True)):
            y = batch.labels[task]  # (B,)
            mask = batch.masks.get(task, torch.ones_like(y))  # (B,)
            if kind == "binary":
                row = F.binary_cross_entropy(out[:, k], y, reduction="none")
            else:
                row = F.mse_loss(out[:, k], y, reduction="none")
            total = total + (row * mask).sum() / mask.sum().clamp(min=1.0)
        return total

    def predict(self, cat: Tensor, dense: Tensor) -> dict[str, Tensor]:
        """Return per-task predictions (B,): probabilities for binary tasks, else values."""
        out = self._outputs(cat, dense)  # (B, T)
        return {task: out[:, k] for k, task in enumerate(self.tasks)}
