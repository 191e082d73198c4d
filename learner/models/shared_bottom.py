"""Shared-bottom: one MLP shared by all tasks (hard parameter sharing)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from learner.models.base import Backbone, check_dropout, check_hidden
from learner.models.experts import Expert

__all__ = ["SharedBottom", "SharedBottomConfig"]


@dataclass(frozen=True)
class SharedBottomConfig:
    """Config of `SharedBottom`."""

    hidden: tuple[int, ...] = (128, 64)  # shared MLP layer sizes
    dropout: float = 0.0  # dropout after each hidden layer

    def __post_init__(self) -> None:
        check_hidden("hidden", self.hidden)
        check_dropout(self.dropout)


class SharedBottom(Backbone):
    """One `Expert` whose output feeds every task tower.

    Call Args: x (B, in_dim).  Returns: {task: (B, hidden[-1])}, the same tensor for all.
    """

    def __init__(self, config: SharedBottomConfig, in_dim: int, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        self.bottom = Expert(in_dim, config.hidden, config.dropout)
        self.out_dim = config.hidden[-1]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.bottom(x)  # (B, H)
        return dict.fromkeys(self.tasks, h)
