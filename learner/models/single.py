"""Single-task towers: one independent MLP per task, nothing shared (the no-MTL baseline)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from learner.models.base import Backbone, check_dropout, check_hidden
from learner.models.experts import Expert

__all__ = ["SingleTask", "SingleTaskConfig"]


@dataclass(frozen=True)
class SingleTaskConfig:
    """Config of `SingleTask`."""

    hidden: tuple[int, ...] = (128, 64)  # per-task MLP layer sizes
    dropout: float = 0.0  # dropout after each hidden layer

    def __post_init__(self) -> None:
        check_hidden("hidden", self.hidden)
        check_dropout(self.dropout)


class SingleTask(Backbone):
    """One `Expert` per task on the shared input.

    Call Args: x (B, in_dim).  Returns: {task: (B, hidden[-1])}.
    """

    def __init__(self, config: SingleTaskConfig, in_dim: int, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        self.nets = nn.ModuleDict(
            {t: Expert(in_dim, config.hidden, config.dropout) for t in self.tasks}
        )
        self.out_dim = config.hidden[-1]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.nets[t](x) for t in self.tasks}  # task -> (B, H)
