"""Gates: softmax weights over experts given a selector input, and the weighted fusion."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Gate", "fuse"]


class Gate(nn.Module):
    """Linear selector -> softmax over `n_experts`.

    Call Args: selector (B, in_dim).  Returns: (B, n_experts), rows sum to 1.
    """

    def __init__(self, in_dim: int, n_experts: int) -> None:
        super().__init__()
        if n_experts < 1:
            raise ValueError(f"a gate needs n_experts >= 1, got {n_experts}")
        self.proj = nn.Linear(in_dim, n_experts)
        self.n_experts = n_experts

    def forward(self, selector: Tensor) -> Tensor:
        return torch.softmax(self.proj(selector), dim=-1)  # (B, E)


def fuse(weights: Tensor, experts: Tensor) -> Tensor:
    """Mix expert outputs (B, E, H) with gate weights (B, E) into (B, H)."""
    if torch.is_grad_enabled():
        # Training: multiply-and-sum; with a handful of experts, bmm's B tiny matrix products
        # were 1.75x slower forward+backward (B=4096, E=4, H=64).
        return (weights.unsqueeze(-1) * experts).sum(dim=1)  # (B, E, 1) * (B, E, H) -> (B, H)
    # Inference (and the ONNX export, traced without grad): ONNX Runtime runs the MatMul
    # form faster (1.19 vs 1.53 ms for the default PLE at 500 rows). Equal up to rounding.
    return torch.bmm(weights.unsqueeze(1), experts).squeeze(1)  # (B, 1, E) @ (B, E, H)
