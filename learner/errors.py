"""Exceptions raised by the learner's models, inputs and losses."""

from __future__ import annotations

__all__ = ["ConfigError", "InputShapeError", "LearnerError"]


class LearnerError(Exception):
    """Base class of every error the learner raises on purpose."""


class ConfigError(LearnerError, ValueError):
    """A model, feature or loss configuration is invalid or incompatible with this code."""


class InputShapeError(LearnerError, ValueError):
    """Input tensors do not match the feature spec the model was built with."""
