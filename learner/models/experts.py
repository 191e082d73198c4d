"""Experts: small ReLU MLPs, alone or as a group sharing one input."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from learner.models.base import check_dropout, check_hidden

__all__ = ["Expert", "ExpertGroup"]


class Expert(nn.Module):
    """MLP of Linear -> ReLU (-> Dropout) layers.

    Call Args: x (B, in_dim).  Returns: (B, hidden[-1]).
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        check_hidden("expert hidden", hidden)
        check_dropout(dropout)
        layers: list[nn.Module] = []
        for d_in, d_out in zip([in_dim, *hidden[:-1]], hidden, strict=True):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        self.net = nn.Sequential(*layers)
        self.out_dim = hidden[-1]

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)  # (B, H)
        return out


class ExpertGroup(nn.Module):
    """`n` experts reading the same input.

    Call Args: x (B, in_dim).  Returns: n outputs (B, hidden[-1]), a list (``gates.fuse`` mixes
    them; stacking them into one tensor is a copy that inference does without).
    """

    def __init__(self, n: int, in_dim: int, hidden: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"an expert group needs n >= 1 experts, got {n}")
        self.experts = nn.ModuleList(Expert(in_dim, hidden, dropout) for _ in range(n))
        self.out_dim = hidden[-1]

    def __len__(self) -> int:
        return len(self.experts)

    def forward(self, x: Tensor) -> list[Tensor]:
        return [expert(x) for expert in self.experts]  # n x (B, H)
