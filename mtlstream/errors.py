"""Errors raised by the mtlstream shell (settings, CLI, local services)."""

from __future__ import annotations

__all__ = [
    "MtlstreamError",
    "PortInUseError",
    "ServiceError",
    "ServiceStartError",
    "SettingsError",
]


class MtlstreamError(Exception):
    """Base class of every error raised by mtlstream itself."""


class SettingsError(MtlstreamError, ValueError):
    """A setting (environment variable or flag) has an invalid value."""


class ServiceError(MtlstreamError):
    """A local service (Kafka broker or Redis server) could not be managed."""


class PortInUseError(ServiceError):
    """The port a local service should listen on is taken by another process."""


class ServiceStartError(ServiceError):
    """A local service was started but did not become ready."""
