"""The MMoE paper's synthetic two-task regression data, with controllable task correlation.

Ma et al. 2018 (MMoE), section 3.2: with orthogonal unit vectors u1, u2 in R^d,
``w1 = c*u1``, ``w2 = c*(p*u1 + sqrt(1 - p^2)*u2)``, ``x ~ N(0, I_d)`` and
``y_k = w_k^T x + sum_{i=1..m} sin(alpha_i * w_k^T x + beta_i) + eps``. The cosine of
w1 and w2 is p, which controls how related the two tasks are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

__all__ = ["SyntheticMTL", "make_synthetic_mtl"]


@dataclass(frozen=True)
class SyntheticMTL:
    """Inputs `x` (N, d), labels `y` (N, 2), both float32, and the task vectors (2, d)."""

    x: NDArray[np.float32]  # (N, d)
    y: NDArray[np.float32]  # (N, 2), column k is task k
    task_vectors: NDArray[np.float64]  # (2, d): w1, w2
    correlation: float  # p = cos(w1, w2)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def tensors(self) -> tuple[Tensor, Tensor]:
        """Return `(x, y)` as torch tensors (zero-copy)."""
        return torch.from_numpy(self.x), torch.from_numpy(self.y)


def _orthonormal_pair(rng: np.random.Generator, dim: int) -> NDArray[np.float64]:
    """Return two orthogonal unit vectors (2, d) by Gram-Schmidt on Gaussian draws."""
    a, b = rng.standard_normal((2, dim))
    u1 = a / np.linalg.norm(a)
    b = b - (b @ u1) * u1
    return np.stack([u1, b / np.linalg.norm(b)])


def make_synthetic_mtl(
    n_samples: int,
    dim: int,
    correlation: float,
    seed: int,
    *,
    scale: float = 1.0,
    n_sines: int = 10,
    noise_var: float = 0.01,
    n_test: int = 0,
) -> tuple[SyntheticMTL, SyntheticMTL]:
    """Generate train and test sets (same task vectors, independent x), deterministic by seed.

    alpha_i = i and beta_i = (i - 1)^2 for i = 1..n_sines; eps ~ N(0, noise_var).

    Examples
    --------
    >>> train, test = make_synthetic_mtl(100, 8, correlation=0.5, seed=0, n_test=10)
    >>> train.x.shape, train.y.shape, len(test)
    ((100, 8), (100, 2), 10)
    >>> w1, w2 = train.task_vectors
    >>> round(float(w1 @ w2), 6)
    0.5
    """
    if not -1.0 <= correlation <= 1.0:
        raise ValueError(f"correlation must be in [-1, 1], got {correlation}")
    if dim < 2:
        raise ValueError(f"dim must be >= 2 to hold two orthogonal vectors, got {dim}")
    rng = np.random.default_rng(seed)
    u1, u2 = _orthonormal_pair(rng, dim)
    w = scale * np.stack([u1, correlation * u1 + math.sqrt(1.0 - correlation**2) * u2])  # (2, d)
    alpha = np.arange(1, n_sines + 1, dtype=np.float64)  # (m,)
    beta = (alpha - 1.0) ** 2  # (m,)

    def draw(n: int) -> SyntheticMTL:
        x = rng.standard_normal((n, dim))  # (n, d)
        proj = x @ w.T  # (n, 2)
        waves = np.sin(proj[..., None] * alpha + beta).sum(-1)  # (n, 2, m) -> (n, 2)
        y = proj + waves + rng.normal(0.0, math.sqrt(noise_var), size=(n, 2))
        return SyntheticMTL(x.astype(np.float32), y.astype(np.float32), w, correlation)

    return draw(n_samples), draw(n_test)
