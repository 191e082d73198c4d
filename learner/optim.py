"""The learner's optimizers, shared by the online daemon and the offline evaluation harness.

Adam on dense parameters; SparseAdam on embedding tables switched to sparse gradients, so a
step reads and updates only the rows a batch touched (a dense Adam step over hashed tables of
2**18 rows would cost more than the whole forward pass). Tables learn at their own rate.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["clipped_params", "make_optimizers"]


def make_optimizers(
    model: nn.Module,
    extra: Iterable[nn.Parameter] = (),
    *,
    lr: float,
    embedding_lr: float,
    sparse_embeddings: bool = True,
) -> dict[str, torch.optim.Optimizer]:
    """Return ``{"dense": Adam, "sparse": SparseAdam}`` for ``model`` plus ``extra`` parameters.

    ``"sparse"`` is absent when the model has no embedding table (a dense-only feature spec)
    or when ``sparse_embeddings`` is off; then the tables are a second group of the dense Adam,
    at ``embedding_lr``. Gradient clipping applies to the ``"dense"`` optimizer's parameters.

    Examples
    --------
    >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 1))
    >>> sorted(make_optimizers(model, lr=1e-3, embedding_lr=1e-2))
    ['dense', 'sparse']
    >>> sorted(make_optimizers(nn.Linear(4, 1), lr=1e-3, embedding_lr=1e-2))
    ['dense']
    """
    tables = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    table_ids = {id(m.weight) for m in tables}
    dense = [p for p in [*model.parameters(), *extra] if id(p) not in table_ids]
    weights = [m.weight for m in tables]
    if not weights:
        return {"dense": torch.optim.Adam(dense, lr=lr)}
    if not sparse_embeddings:
        groups: list[dict[str, Any]] = [
            {"params": dense},
            {"params": weights, "lr": embedding_lr},
        ]
        return {"dense": torch.optim.Adam(groups, lr=lr)}
    for module in tables:
        module.sparse = True  # same weights and snapshot format; only the gradient changes
    return {
        "dense": torch.optim.Adam(dense, lr=lr),
        "sparse": torch.optim.SparseAdam(weights, lr=embedding_lr),
    }


def clipped_params(optimizers: dict[str, torch.optim.Optimizer]) -> list[nn.Parameter]:
    """Parameters whose gradient norm is clipped: those of the ``"dense"`` optimizer.

    Sparse embedding rows are not clipped: SparseAdam normalises each row's step, and clipping
    would need a coalesce per table per step.
    """
    return [p for group in optimizers["dense"].param_groups for p in group["params"]]
