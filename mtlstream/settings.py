"""Settings dataclasses read from environment variables (one dataclass per process).

Each field declares its environment variable next to it with :func:`env_field`; :func:`from_env`
reads them from an injected mapping (``os.environ`` by default) so tests can pass a plain dict.

Examples
--------
>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Example:
...     port: int = env_field(6379, "EXAMPLE_PORT", "TCP port")
...     verbose: bool = env_field(False, "EXAMPLE_VERBOSE", "log more")
>>> from_env(Example, {"EXAMPLE_PORT": "7000", "EXAMPLE_VERBOSE": "yes"})
Example(port=7000, verbose=True)
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from mtlstream.errors import SettingsError

__all__ = [
    "DEFAULT_KAFKA",
    "DEFAULT_REDIS",
    "describe",
    "env_field",
    "from_env",
]

#: Where a local broker and Redis listen unless told otherwise.
DEFAULT_KAFKA = "127.0.0.1:9092"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

T = TypeVar("T")


def env_field(default: Any, env: str, help: str) -> Any:
    """Declare a settings field with its environment variable and a one-line help text."""
    if isinstance(default, list | dict | set):
        raise ValueError(f"{env}: use a tuple or a frozen value as default, not {type(default)}")
    return dataclasses.field(default=default, metadata={"env": env, "help": help})


def _parse(raw: str, kind: Any, env: str) -> Any:
    """Convert one environment string to the field's declared type."""
    try:
        if kind is bool:
            value = raw.strip().lower()
            if value in _TRUE:
                return True
            if value in _FALSE:
                return False
            raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}")
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is Path:
            return Path(raw).expanduser()
        if kind is str:
            return raw
        if typing.get_origin(kind) is tuple:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
    except ValueError as exc:
        raise SettingsError(
            f"{env}={raw!r} is not a valid {getattr(kind, '__name__', kind)}: {exc}"
        ) from exc
    raise SettingsError(f"{env}: unsupported settings type {kind!r}")


def from_env(cls: type[T], env: Mapping[str, str] | None = None, **overrides: Any) -> T:
    """Build a settings dataclass from ``env`` (default ``os.environ``), then apply ``overrides``.

    Overrides that are ``None`` are ignored, so CLI flags that were not given fall through to the
    environment and then to the field default.
    """
    source = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = f.metadata.get("env")
        if name is not None and name in source:
            values[f.name] = _parse(source[name], hints[f.name], name)
    unknown = set(overrides) - set(hints)
    if unknown:
        raise SettingsError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)


def describe(cls: type[Any]) -> list[tuple[str, str, str]]:
    """List ``(env var, default, help)`` for every field of a settings class."""
    rows = []
    for f in dataclasses.fields(cls):
        if "env" in f.metadata:
            rows.append((f.metadata["env"], repr(f.default), f.metadata["help"]))
    return rows
