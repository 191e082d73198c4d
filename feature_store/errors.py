"""Errors raised by feature_store."""

from __future__ import annotations

__all__ = [
    "CorruptSnapshot",
    "CorruptSnapshotError",
    "FeatureStoreError",
    "InvalidFeatureError",
    "InvalidKeyPartError",
    "PublishConflictError",
    "SnapshotNotFoundError",
]


class FeatureStoreError(Exception):
    """Base class of every error raised by feature_store."""


class InvalidKeyPartError(FeatureStoreError, ValueError):
    """An id or name is empty, too long, or holds a character that would break the key layout."""


class InvalidFeatureError(FeatureStoreError, ValueError):
    """A feature name or value cannot be stored (reserved name, unsupported type, NaN)."""


class SnapshotNotFoundError(FeatureStoreError, LookupError):
    """No snapshot was published under that model name, or that version is not stored."""


class CorruptSnapshotError(FeatureStoreError):
    """A stored snapshot lacks its blob or metadata, or its blob fails the sha256 check."""


class PublishConflictError(FeatureStoreError):
    """A WATCHed snapshot transaction kept losing races with other writers and gave up."""


#: The name the design brief uses; ruff's N818 wants the ``Error`` suffix on the class itself.
CorruptSnapshot = CorruptSnapshotError
