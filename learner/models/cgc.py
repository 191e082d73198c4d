"""CGC (Customized Gate Control): one PLE extraction level, task-specific + shared experts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from learner.errors import ConfigError
from learner.models.base import Backbone, check_dropout, check_hidden
from learner.models.experts import ExpertGroup
from learner.models.gates import Gate, fuse

__all__ = ["CGC", "CGCConfig", "ExtractionLayer"]


@dataclass(frozen=True)
class CGCConfig:
    """Config of `CGC` and of each `ExtractionLayer`."""

    n_task_experts: int = 1  # experts owned by each task
    n_shared_experts: int = 2  # experts shared by all tasks
    expert_hidden: tuple[int, ...] = (64,)  # each expert's MLP layer sizes
    dropout: float = 0.0  # dropout after each expert layer

    def __post_init__(self) -> None:
        for name in ("n_task_experts", "n_shared_experts"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        check_hidden("expert_hidden", self.expert_hidden)
        check_dropout(self.dropout)


class ExtractionLayer(nn.Module):
    """One extraction level (PLE paper eqs. 10-15 of the seeds).

    Each task gate mixes its own experts and the shared experts, selected by that task's
    input; the optional shared gate mixes all experts (task experts in task order, then the
    shared ones), selected by the shared input. The last level of a PLE has no shared gate.

    Call Args: task_inputs {task: (B, in_dim)}, shared_input (B, in_dim).
    Returns: ({task: (B, H)}, shared (B, H) or None, gate weights {task|"shared": (B, E)}).
    """

    def __init__(
        self, config: CGCConfig, in_dim: int, tasks: Sequence[str], shared_gate: bool
    ) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        n_t, n_s, hidden = config.n_task_experts, config.n_shared_experts, config.expert_hidden
        self.task_experts = nn.ModuleDict(
            {t: ExpertGroup(n_t, in_dim, hidden, config.dropout) for t in self.tasks}
        )
        self.shared_experts = ExpertGroup(n_s, in_dim, hidden, config.dropout)
        self.task_gates = nn.ModuleDict({t: Gate(in_dim, n_t + n_s) for t in self.tasks})
        self.shared_gate = Gate(in_dim, len(self.tasks) * n_t + n_s) if shared_gate else None
        self.out_dim = hidden[-1]

    def forward(
        self, task_inputs: Mapping[str, Tensor], shared_input: Tensor
    ) -> tuple[dict[str, Tensor], Tensor | None, dict[str, Tensor]]:
        shared = self.shared_experts(shared_input)  # S x (B, H)
        own = {t: self.task_experts[t](task_inputs[t]) for t in self.tasks}  # task -> K x (B, H)
        fused: dict[str, Tensor] = {}
        weights: dict[str, Tensor] = {}
        for t in self.tasks:
            w = self.task_gates[t](task_inputs[t])  # (B, T + S)
            fused[t] = fuse(w, own[t] + shared)  # (B, H)
            weights[t] = w
        if self.shared_gate is None:
            return fused, None, weights
        w = self.shared_gate(shared_input)  # (B, K*T + S)
        every = [out for t in self.tasks for out in own[t]] + shared  # (K*T + S) x (B, H)
        weights["shared"] = w
        return fused, fuse(w, every), weights


class CGC(Backbone):
    """CGC: PLE with a single extraction level (so no shared gate).

    Call Args: x (B, in_dim).  Returns: {task: (B, expert_hidden[-1])}.
    Gate weights: "level0/{task}" (B, n_task_experts + n_shared_experts).
    """

    def __init__(self, config: CGCConfig, in_dim: int, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        self.layer = ExtractionLayer(config, in_dim, self.tasks, shared_gate=False)
        self.out_dim = self.layer.out_dim

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        fused: dict[str, Tensor]
        weights: dict[str, Tensor]
        fused, _, weights = self.layer(dict.fromkeys(self.tasks, x), x)
        self._gates = {f"level0/{k}": w.detach() for k, w in weights.items()}
        return fused
