"""Atomic on-disk checkpoints: tensors in safetensors, everything else in JSON, never pickle.

Layout of a checkpoint directory::

    LATEST                        name of the newest complete checkpoint (replaced atomically)
    ckpt-000000001234-<ns>/
        tensors.safetensors       model, optimizer, loss weighting, metrics, dedupe state
        meta.json                 step, offsets, counters, model args, ...; tensors_sha256

A checkpoint is written into a hidden temporary directory, fsynced, renamed into place, and only
then named by ``LATEST`` (write a temporary file, fsync, ``os.replace``). A crash at any point
leaves ``LATEST`` naming a complete checkpoint (or no ``LATEST`` before the first one); stale
temporary directories are removed by the next save.

Examples
--------
>>> import tempfile, torch
>>> with tempfile.TemporaryDirectory() as d:
...     _ = save_checkpoint(Path(d), {"w": torch.ones(2)}, {"step": 3})
...     ckpt = load_checkpoint(Path(d))
>>> ckpt.meta["step"], ckpt.tensors["w"].tolist()
(3, [1.0, 1.0])
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson
import safetensors.torch
import torch
from torch import Tensor

from learner.errors import LearnerError

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "load_checkpoint",
    "load_optimizer_state",
    "optimizer_state",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION: Final = 1
LATEST: Final = "LATEST"
_TENSORS: Final = "tensors.safetensors"
_META: Final = "meta.json"
_PREFIX: Final = "ckpt-"
_TMP_PREFIX: Final = ".tmp-"


class CheckpointError(LearnerError):
    """A checkpoint is missing a file, fails its sha256 check or has an unknown format."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: its directory, tensors and JSON metadata."""

    path: Path
    tensors: dict[str, Tensor]
    meta: dict[str, Any]


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cpu_contiguous(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # safetensors wants dense, contiguous, unshared CPU storage
    return {k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()}


def save_checkpoint(
    directory: Path, tensors: Mapping[str, Tensor], meta: Mapping[str, Any], keep: int = 2
) -> Path:
    """Write a checkpoint atomically, point ``LATEST`` at it, prune all but the newest `keep`.

    Parameters
    ----------
    directory
        The checkpoint directory (created if missing).
    tensors
        Named tensors; saved from CPU copies.
    meta
        JSON-serialisable metadata; ``step`` (int) orders checkpoints by name.
    keep
        Checkpoints kept, the new one included (>= 1).
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    directory.mkdir(parents=True, exist_ok=True)
    blob = safetensors.torch.save(_cpu_contiguous(tensors))
    full_meta = {
        **meta,
        "format_version": FORMAT_VERSION,
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
        "saved_at": int(time.time() * 1000),
    }
    tmp = directory / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
    tmp.mkdir()
    _write_synced(tmp / _TENSORS, blob)
    _write_synced(tmp / _META, orjson.dumps(full_meta, option=orjson.OPT_SERIALIZE_NUMPY))
    _sync_dir(tmp)
    name = f"{_PREFIX}{int(meta.get('step', 0)):012d}-{time.time_ns()}"
    os.rename(tmp, directory / name)
    _sync_dir(directory)
    pointer = directory / f"{_TMP_PREFIX}{LATEST}-{uuid.uuid4().hex}"
    _write_synced(pointer, name.encode())
    os.replace(pointer, directory / LATEST)
    _sync_dir(directory)
    _prune(directory, name, keep)
    logger.debug("checkpoint saved path=%s bytes=%d", directory / name, len(blob))
    return directory / name


def _prune(directory: Path, latest: str, keep: int) -> None:
    names = sorted(p.name for p in directory.iterdir() if p.name.startswith(_PREFIX))
    doomed = [n for n in names[:-keep] if n != latest]
    doomed += [p.name for p in directory.iterdir() if p.name.startswith(_TMP_PREFIX)]
    for name in doomed:
        path = directory / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def load_checkpoint(directory: Path) -> Checkpoint | None:
    """Load the checkpoint ``LATEST`` names; ``None`` when the directory holds none yet."""
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    path = directory / pointer.read_text().strip()
    try:
        blob = (path / _TENSORS).read_bytes()
        meta = orjson.loads((path / _META).read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format_version {meta.get('format_version')!r}; "
            f"this code reads format_version {FORMAT_VERSION}"
        )
    actual = hashlib.sha256(blob).hexdigest()
    if actual != meta.get("tensors_sha256"):
        raise CheckpointError(f"checkpoint {path}: tensors sha256 {actual} != recorded")
    return Checkpoint(path=path, tensors=safetensors.torch.load(blob), meta=meta)


def optimizer_state(
    optimizer: torch.optim.Optimizer, prefix: str
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimizer's state_dict into named tensors and a JSON-able rest."""
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for idx, entries in sd["state"].items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"{prefix}.{idx}.{key}"] = value
            else:
                plain.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "state": plain}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    tensors: Mapping[str, Tensor],
    prefix: str,
    meta: Mapping[str, Any],
) -> None:
    """Restore an optimizer from `optimizer_state` output."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith(f"{prefix}."):
            idx, _, key = name[len(prefix) + 1 :].partition(".")
            state.setdefault(int(idx), {})[key] = value
    for idx, entries in meta["state"].items():
        state.setdefault(int(idx), {}).update(entries)
    groups = [
        {k: tuple(v) if k == "betas" else v for k, v in group.items()}
        for group in meta["param_groups"]
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
