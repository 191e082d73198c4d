"""Shared pieces of the backbones: the `Backbone` base class and config (de)serialisation."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from torch import Tensor, nn

from learner.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = ["Backbone", "check_dropout", "check_hidden", "config_from_dict", "config_to_dict"]

ConfigT = TypeVar("ConfigT", bound="DataclassInstance")


class Backbone(nn.Module):
    """Maps the encoded input (B, D_in) to one representation (B, out_dim) per task.

    Subclasses set `out_dim` and store the gate weights of their last forward (detached)
    in `_gates`, keyed "level{j}/{task}" or "level{j}/shared".
    """

    out_dim: int

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self._gates: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def gate_weights(self) -> dict[str, Tensor]:
        """Return the gate weights (B, n_experts) of the last forward, per level and task."""
        return dict(self._gates)


def check_hidden(name: str, hidden: Sequence[int], allow_empty: bool = False) -> None:
    """Raise `ConfigError` unless `hidden` is a sequence of positive ints."""
    if not allow_empty and len(hidden) == 0:
        raise ConfigError(f"{name} needs at least one layer, got {hidden!r}")
    if any(not isinstance(h, int) or isinstance(h, bool) or h < 1 for h in hidden):
        raise ConfigError(f"{name} must hold positive ints, got {hidden!r}")


def check_dropout(dropout: float) -> None:
    """Raise `ConfigError` unless 0 <= dropout < 1."""
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")


def config_to_dict(config: DataclassInstance) -> dict[str, Any]:
    """Return a config dataclass as a JSON-serialisable dict (tuples become lists)."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
    }


def config_from_dict(cls: type[ConfigT], data: Mapping[str, Any]) -> ConfigT:
    """Build config `cls` from a (possibly partial) dict; missing keys take the defaults."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{cls.__name__} must be a mapping, got {type(data).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - fields
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys {sorted(unknown)}; known: {sorted(fields)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad {cls.__name__}: {exc}") from exc
