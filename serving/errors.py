"""Errors raised by serving."""

from __future__ import annotations

__all__ = [
    "IncompatibleSnapshotError",
    "RequestError",
    "ServingError",
]


class ServingError(Exception):
    """Base class of every error raised by serving."""


class RequestError(ServingError, ValueError):
    """A request the scorer answers with a JSON error: 4xx when invalid, 503 before a model."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        # HTTP status: 400 unparseable, 413 too large, 422 invalid content, 503 no model yet
        self.status = status
        # stable machine-readable reason, e.g. "too_many_candidates"
        self.code = code
        self.message = message
        # the request field at fault, e.g. "candidates[3]"; None when it is the whole body
        self.field = field

    def to_dict(self) -> dict[str, object]:
        """Return the JSON error body ``{"error": {"code", "message", "field"}}``."""
        return {"error": {"code": self.code, "message": self.message, "field": self.field}}


class IncompatibleSnapshotError(ServingError):
    """A snapshot cannot be served with this scorer's settings (e.g. a fusion task it lacks)."""
