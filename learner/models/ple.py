"""PLE (Progressive Layered Extraction): a stack of CGC extraction levels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from learner.errors import ConfigError
from learner.models.base import Backbone, check_dropout, check_hidden
from learner.models.cgc import CGCConfig, ExtractionLayer

__all__ = ["PLE", "PLEConfig"]


@dataclass(frozen=True)
class PLEConfig:
    """Config of `PLE`; every level has the same expert counts and sizes."""

    n_levels: int = 2  # extraction levels; 1 is CGC
    n_task_experts: int = 1  # experts owned by each task, per level
    n_shared_experts: int = 2  # shared experts, per level
    expert_hidden: tuple[int, ...] = (64,)  # each expert's MLP layer sizes
    dropout: float = 0.0  # dropout after each expert layer

    def __post_init__(self) -> None:
        if not isinstance(self.n_levels, int) or self.n_levels < 1:
            raise ConfigError(f"n_levels must be an int >= 1, got {self.n_levels!r}")
        check_hidden("expert_hidden", self.expert_hidden)
        check_dropout(self.dropout)
        self.level_config()  # validates the expert counts

    def level_config(self) -> CGCConfig:
        """Return the config of one extraction level."""
        return CGCConfig(
            self.n_task_experts, self.n_shared_experts, self.expert_hidden, self.dropout
        )


class PLE(Backbone):
    """`n_levels` extraction levels; level j > 0 reads level j-1's fused outputs.

    At level 0 every expert and gate reads the input x. From level 1 on, task k's experts
    and gate read task k's fused output of the previous level, and the shared experts and
    shared gate read the previous shared fused output. The last level has no shared gate.

    Call Args: x (B, in_dim).  Returns: {task: (B, expert_hidden[-1])}.
    Gate weights: "level{j}/{task}" (B, T + S) and, below the last level,
    "level{j}/shared" (B, K*T + S).
    """

    def __init__(self, config: PLEConfig, in_dim: int, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        level = config.level_config()
        dims = [in_dim] + [config.expert_hidden[-1]] * (config.n_levels - 1)
        self.levels = nn.ModuleList(
            ExtractionLayer(level, d, self.tasks, shared_gate=j < config.n_levels - 1)
            for j, d in enumerate(dims)
        )
        self.out_dim = config.expert_hidden[-1]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        task_inputs = dict.fromkeys(self.tasks, x)  # task -> (B, D)
        shared: Tensor | None = x
        self._gates = {}
        for j, layer in enumerate(self.levels):
            task_inputs, shared, weights = layer(task_inputs, shared)
            self._gates.update({f"level{j}/{k}": w.detach() for k, w in weights.items()})
        return task_inputs
