"""Errors raised on purpose by the offline evaluation harness."""

from __future__ import annotations

__all__ = ["DatasetError", "EvaluationError"]


class EvaluationError(Exception):
    """Base class of every error the evaluation harness raises on purpose."""


class DatasetError(EvaluationError, ValueError):
    """A data set cannot be loaded: its installed files are missing or not as expected."""
