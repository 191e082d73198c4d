"""Task towers: a per-task MLP head ending in one raw output per row."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from learner.models.base import check_dropout, check_hidden
from learner.models.experts import Expert

__all__ = ["TaskTower"]


class TaskTower(nn.Module):
    """Optional MLP then Linear -> 1: a logit, log1p-value, log-rate or value per row.

    Call Args: h (B, in_dim).  Returns: (B,).
    """

    def __init__(self, in_dim: int, hidden: Sequence[int] = (), dropout: float = 0.0) -> None:
        super().__init__()
        check_hidden("tower hidden", hidden, allow_empty=True)
        check_dropout(dropout)
        self.mlp: nn.Module = Expert(in_dim, hidden, dropout) if hidden else nn.Identity()
        self.head = nn.Linear(hidden[-1] if hidden else in_dim, 1)

    def forward(self, h: Tensor) -> Tensor:
        out: Tensor = self.head(self.mlp(h))  # (B, 1)
        return out.squeeze(-1)  # (B,)
