"""learner.datasets: synthetic data sets for offline evaluation of the multi-task models."""

from __future__ import annotations

from learner.datasets.synthetic import SyntheticMTL, make_synthetic_mtl

__all__ = ["SyntheticMTL", "make_synthetic_mtl"]
