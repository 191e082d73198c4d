"""MMoE (one gate per task over shared experts) and OMoE (one gate shared by all tasks)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from learner.errors import ConfigError
from learner.models.base import Backbone, check_dropout, check_hidden
from learner.models.experts import ExpertGroup
from learner.models.gates import Gate, fuse

__all__ = ["MMoE", "MMoEConfig", "OMoE"]


@dataclass(frozen=True)
class MMoEConfig:
    """Config of `MMoE` and `OMoE`."""

    n_experts: int = 4  # experts shared by all tasks
    expert_hidden: tuple[int, ...] = (64,)  # each expert's MLP layer sizes
    dropout: float = 0.0  # dropout after each expert layer

    def __post_init__(self) -> None:
        if not isinstance(self.n_experts, int) or self.n_experts < 1:
            raise ConfigError(f"n_experts must be an int >= 1, got {self.n_experts!r}")
        check_hidden("expert_hidden", self.expert_hidden)
        check_dropout(self.dropout)


class MMoE(Backbone):
    """Shared experts mixed per task by that task's gate on the input.

    Call Args: x (B, in_dim).  Returns: {task: (B, expert_hidden[-1])}.
    Gate weights: "level0/{task}" (B, n_experts); OMoE: "level0/shared".
    """

    one_gate = False

    def __init__(self, config: MMoEConfig, in_dim: int, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        self.experts = ExpertGroup(config.n_experts, in_dim, config.expert_hidden, config.dropout)
        gate_names = ["shared"] if self.one_gate else list(self.tasks)
        self.gates = nn.ModuleDict({g: Gate(in_dim, config.n_experts) for g in gate_names})
        self.out_dim = self.experts.out_dim

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        experts = self.experts(x)  # E x (B, H)
        out: dict[str, Tensor] = {}
        self._gates = {}
        for name, gate in self.gates.items():
            w = gate(x)  # (B, E)
            self._gates[f"level0/{name}"] = w.detach()
            out[name] = fuse(w, experts)  # (B, H)
        if self.one_gate:
            return dict.fromkeys(self.tasks, out["shared"])
        return out


class OMoE(MMoE):
    """One-gate MoE: a single gate, shared by all tasks, over the shared experts."""

    one_gate = True
