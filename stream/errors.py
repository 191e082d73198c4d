"""Errors raised by the stream package."""

from __future__ import annotations

__all__ = ["BadEventError", "BadStateError", "StreamError"]


class StreamError(Exception):
    """Base class of every error raised on purpose by ``stream/``."""


class BadEventError(StreamError, ValueError):
    """An input record cannot be used; it belongs in ``dead_letters`` with ``reason``.

    ``reason`` is a short machine-friendly code such as ``"invalid_json"``,
    ``"missing:ts"``, ``"bad_type:ts"`` or ``"ts_in_future"``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BadStateError(StreamError, ValueError):
    """A stored join state cannot be read back (corrupt or from an unknown version)."""
