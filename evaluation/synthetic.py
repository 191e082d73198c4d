"""The MMoE paper's synthetic two-task regression data, as evaluation data sets.

The generator is the learner's (`learner.datasets.make_synthetic_mtl`); here it is only cut
into train / validation / test. Each seed draws new task vectors and new inputs, as the
paper repeats its experiment over independent draws.
"""

from __future__ import annotations

import numpy as np

from evaluation.datasets import Dataset, Split
from learner.datasets import SyntheticMTL, make_synthetic_mtl
from learner.features import FeatureSpec

__all__ = ["CORRELATIONS", "load_synthetic"]

#: task correlations of the MMoE paper's figure 4
CORRELATIONS = (1.0, 0.9, 0.5, 0.0)
TASKS = ("y1", "y2")


def _split(data: SyntheticMTL, rows: slice) -> Split:
    x, y = data.x[rows], data.y[rows]  # (n, d), (n, 2)
    no_cat = np.zeros((len(x), 0), dtype=np.int64)
    return Split(no_cat, x, {t: np.ascontiguousarray(y[:, k]) for k, t in enumerate(TASKS)})


def load_synthetic(
    correlation: float, seed: int, n_train: int = 16_000, n_eval: int = 4_000, dim: int = 16
) -> Dataset:
    """Return one synthetic draw: `n_train` training rows, `n_eval` validation and test rows.

    Examples
    --------
    >>> data = load_synthetic(0.5, seed=0, n_train=100, n_eval=10, dim=4)
    >>> len(data.train), len(data.valid), len(data.test), data.spec.dense
    (100, 10, 10, ['x0', 'x1', 'x2', 'x3'])
    """
    if n_train < 1 or n_eval < 1:
        raise ValueError(f"n_train and n_eval must be >= 1, got {n_train}, {n_eval}")
    train, held_out = make_synthetic_mtl(n_train, dim, correlation, seed, n_test=2 * n_eval)
    return Dataset(
        name=f"synthetic/p={correlation:g}",
        tasks=dict.fromkeys(TASKS, "regression"),
        spec=FeatureSpec(dense=[f"x{i}" for i in range(dim)]),
        train=_split(train, slice(None)),
        valid=_split(held_out, slice(0, n_eval)),
        test=_split(held_out, slice(n_eval, None)),
        note=(
            f"MMoE synthetic data, correlation p={correlation:g}, d={dim}, c=1, m=10 sines: "
            f"{n_train} train / {n_eval} validation / {n_eval} test rows, a new draw per seed"
        ),
    )
