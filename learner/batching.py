"""Raw `samples` records -> validated columns -> deduplicated training tensors.

The learner reads the plain JSON Sample layout of :mod:`stream.events`. :func:`decode_records`
is its hot path: one pass per record that applies exactly the rules of
:meth:`stream.events.Sample.from_dict` (same accept/reject decisions and reason codes, checked
against :func:`decode_records_naive` in the unit tests) plus the learner's own label checks,
and writes columns instead of building objects. A record that fails is counted under its reason
and skipped; nothing raises on input.

Dedupe horizon: :class:`Deduper` remembers the 64-bit hashes (:func:`sample_hash`) of the last
``horizon`` distinct sample ids it let through, oldest evicted first. A duplicate that arrives
within ``horizon`` distinct samples of the original is dropped; one that arrives later is trained
again. The state is part of the checkpoint, so the horizon holds across restarts.

Examples
--------
>>> from learner.features import default_feature_spec
>>> good = b'{"sample_id":"a","user_id":"u","item_id":"i","ts":1,"kind":"final",'
>>> good += b'"labels":{"click":1,"conversion":0,"ysl":0},"revision":0,"elapsed_ms":5,'
>>> good += b'"masks":{"ctr":1,"cvr":1,"ctcvr":1,"ysl":1},"emitted_at":7}'
>>> cols = decode_records([good, b"{oops", good], default_feature_spec())
>>> len(cols), dict(cols.bad)
(2, {'invalid_json': 1})
>>> keep = Deduper(horizon=10).filter(cols.hashes)
>>> keep.tolist()
[True, False]
"""

from __future__ import annotations

import hashlib
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import orjson
import torch
from numpy.typing import NDArray
from torch import Tensor

from learner.errors import ConfigError
from learner.features import FeatureSpec, encode_rows
from learner.losses import Targets
from stream.errors import BadEventError
from stream.events import (
    MAX_SAMPLE_ID_LEN,
    SAMPLE_KINDS,
    Sample,
    decode_sample,
)

__all__ = [
    "LABEL_TASKS",
    "MASK_TASKS",
    "Deduper",
    "SampleColumns",
    "TrainBatch",
    "check_tasks",
    "decode_records",
    "decode_records_naive",
    "sample_hash",
]

#: Mask columns of a Sample, in column order of `SampleColumns.masks`.
MASK_TASKS: Final = ("ctr", "cvr", "ctcvr", "ysl")
#: Label of each task the samples topic can train: (click, conversion, ysl) columns combined.
LABEL_TASKS: Final = frozenset(MASK_TASKS)

_FNW_KINDS: Final = frozenset({"early", "correction"})  # delayed-feedback rows (Ktena et al.)
_SCALARS: Final = (str, int, float, bool)
_FEATURE_TYPES: Final = frozenset({*_SCALARS, type(None)})
_U64: Final = 1 << 64


def sample_hash(sample_id: str) -> int:
    """Return the stable 64-bit hash of a sample id (blake2b; same in every process).

    Examples
    --------
    >>> sample_hash("imp-1") == sample_hash("imp-1"), sample_hash("imp-1") == sample_hash("imp-2")
    (True, False)
    """
    return int.from_bytes(hashlib.blake2b(sample_id.encode(), digest_size=8).digest(), "little")


def check_tasks(tasks: Sequence[str]) -> None:
    """Raise `ConfigError` unless every model task has a label on the samples topic."""
    unknown = [t for t in tasks if t not in LABEL_TASKS]
    if unknown:
        raise ConfigError(
            f"model tasks {unknown} have no label on the samples topic, which carries "
            f"{sorted(LABEL_TASKS)}"
        )


@dataclass
class SampleColumns:
    """Valid samples of a run of records as columns (N rows), plus bad-record counts."""

    cat: NDArray[np.int64]  # (N, Fc) hashed buckets
    dense: NDArray[np.float32]  # (N, Fd) NaN = missing
    labels: NDArray[np.float32]  # (N, 3): click, conversion, ysl
    masks: NDArray[np.float32]  # (N, 4): ctr, cvr, ctcvr, ysl sample spaces
    fnw: NDArray[np.float32]  # (N,) 1 for early / correction rows
    hashes: NDArray[np.uint64]  # (N,) sample_hash(sample_id)
    emitted_at: NDArray[np.int64]  # (N,) wall clock at emission, epoch ms
    bad: Counter[str] = field(default_factory=Counter)  # reason -> records skipped

    def __len__(self) -> int:
        return int(self.hashes.shape[0])

    def select(self, keep: NDArray[np.bool_]) -> SampleColumns:
        """Return the rows where `keep` (N,) is true; bad counts are kept as they are."""
        return SampleColumns(
            cat=self.cat[keep],
            dense=self.dense[keep],
            labels=self.labels[keep],
            masks=self.masks[keep],
            fnw=self.fnw[keep],
            hashes=self.hashes[keep],
            emitted_at=self.emitted_at[keep],
            bad=self.bad,
        )

    def to_batch(self, pin_memory: bool = False) -> TrainBatch:
        """Return the rows as CPU tensors (zero-copy; pinned when feeding a GPU)."""
        tensors = [
            torch.from_numpy(np.ascontiguousarray(a))
            for a in (self.cat, self.dense, self.labels, self.masks, self.fnw)
        ]
        if pin_memory:
            tensors = [t.pin_memory() for t in tensors]
        cat, dense, labels, masks, fnw = tensors
        return TrainBatch(cat=cat, dense=dense, labels=labels, masks=masks, fnw=fnw)


@dataclass
class TrainBatch:
    """Training tensors of one micro-batch; `targets()` maps them to the model's tasks."""

    cat: Tensor  # (B, Fc) int64
    dense: Tensor  # (B, Fd) float32, NaN = missing
    labels: Tensor  # (B, 3) float32: click, conversion, ysl
    masks: Tensor  # (B, 4) float32: ctr, cvr, ctcvr, ysl
    fnw: Tensor  # (B,) float32

    def __len__(self) -> int:
        return int(self.cat.shape[0])

    def to(self, device: torch.device, non_blocking: bool = False) -> TrainBatch:
        """Return the batch on `device` (asynchronous copies from pinned memory on CUDA)."""

        def move(t: Tensor) -> Tensor:
            return t.to(device, non_blocking=non_blocking)

        return TrainBatch(
            move(self.cat), move(self.dense), move(self.labels), move(self.masks), move(self.fnw)
        )

    def task_labels(self) -> dict[str, Tensor]:
        """Return every task's label (B,): ctr=click, cvr=conversion, ctcvr=both, ysl=count."""
        click, conversion, ysl = self.labels.unbind(1)  # 3 x (B,)
        return {"ctr": click, "cvr": conversion, "ctcvr": click * conversion, "ysl": ysl}

    def targets(self, tasks: Sequence[str]) -> Targets:
        """Return labels and sample-space masks of `tasks` (the sample's own masks)."""
        labels = self.task_labels()
        masks = dict(zip(MASK_TASKS, self.masks.unbind(1), strict=True))
        return Targets(
            labels={t: labels[t] for t in tasks},
            masks={t: masks[t] for t in tasks},
            fnw=self.fnw,
        )


# --- decoding -----------------------------------------------------------------------------------


def _check_labels(click: int, conversion: int, ysl: int, masks: tuple[int, ...]) -> None:
    """The learner's checks on top of the layout: binary labels, counts >= 0, 0/1 masks."""
    if click not in (0, 1):
        raise BadEventError("bad_value:labels.click")
    if conversion not in (0, 1):
        raise BadEventError("bad_value:labels.conversion")
    if ysl < 0:
        raise BadEventError("bad_value:labels.ysl")
    if any(m not in (0, 1) for m in masks):
        raise BadEventError("bad_value:masks")


@dataclass
class _Rows:
    """Row-wise accumulators of one decode call."""

    features: list[dict[str, Any]] = field(default_factory=list)
    labels: list[tuple[int, int, int]] = field(default_factory=list)
    masks: list[tuple[int, int, int, int]] = field(default_factory=list)
    fnw: list[float] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    emitted_at: list[int] = field(default_factory=list)
    bad: Counter[str] = field(default_factory=Counter)

    def columns(self, spec: FeatureSpec) -> SampleColumns:
        enc = encode_rows(spec, self.features)
        n = len(self.hashes)
        return SampleColumns(
            cat=enc.cat,
            dense=enc.dense,
            labels=np.asarray(self.labels, dtype=np.float32).reshape(n, 3),
            masks=np.asarray(self.masks, dtype=np.float32).reshape(n, len(MASK_TASKS)),
            fnw=np.asarray(self.fnw, dtype=np.float32),
            hashes=np.asarray(self.hashes, dtype=np.uint64),
            emitted_at=np.asarray(self.emitted_at, dtype=np.int64),
            bad=self.bad,
        )


def _parse_one(obj: Any, rows: _Rows) -> None:
    """Validate one decoded JSON value with `Sample.from_dict` (its reasons) and append it."""
    sample = Sample.from_dict(obj)
    label_row = (sample.labels.click, sample.labels.conversion, sample.labels.ysl)
    m = sample.masks
    mask_row = (m.ctr, m.cvr, m.ctcvr, m.ysl)
    features, kind, sample_id = sample.features, sample.kind, sample.sample_id
    emitted_at = sample.emitted_at
    _check_labels(*label_row, mask_row)
    rows.features.append(features)
    rows.labels.append(label_row)
    rows.masks.append(mask_row)
    rows.fnw.append(1.0 if kind in _FNW_KINDS else 0.0)
    rows.hashes.append(sample_hash(sample_id))
    rows.emitted_at.append(emitted_at)


def _append_fast(obj: Any, rows: _Rows) -> bool:
    """Append a well-formed sample in one pass and return True; False sends it to `_parse_one`.

    Accepts exactly what `_parse_one` accepts, testing every condition at once instead of
    in order; anything it declines is re-checked by `_parse_one`, which names the reason.
    """
    if type(obj) is not dict:
        return False
    labels: Any = obj.get("labels")
    masks: Any = obj.get("masks")
    if type(labels) is not dict or type(masks) is not dict:
        return False
    # Any, not Any | None: every value is type-checked below before it is used
    sample_id: Any = obj.get("sample_id")
    user_id: Any = obj.get("user_id")
    item_id: Any = obj.get("item_id")
    features: Any = obj.get("features")
    kind: Any = obj.get("kind")
    label_row: Any = (labels.get("click"), labels.get("conversion"), labels.get("ysl"))
    mask_row: Any = (masks.get("ctr"), masks.get("cvr"), masks.get("ctcvr"), masks.get("ysl"))
    emitted_at: Any = obj.get("emitted_at")
    ints = (obj.get("ts"), obj.get("revision"), obj.get("elapsed_ms"), emitted_at)
    ok = (
        type(kind) is str
        and kind in SAMPLE_KINDS
        and type(sample_id) is str
        and type(user_id) is str
        and type(item_id) is str
        and 0 < len(sample_id) <= MAX_SAMPLE_ID_LEN
        and 0 < len(user_id) <= MAX_SAMPLE_ID_LEN
        and 0 < len(item_id) <= MAX_SAMPLE_ID_LEN
        and {type(v) for v in (*label_row, *mask_row, *ints)} == {int}
        and label_row[0] in (0, 1)
        and label_row[1] in (0, 1)
        and label_row[2] >= 0
        and all(m in (0, 1) for m in mask_row)
        and (features is None or (type(features) is dict and _scalar_values(features)))
    )
    if not ok:
        return False
    rows.features.append(features or {})
    rows.labels.append(label_row)
    rows.masks.append(mask_row)
    rows.fnw.append(1.0 if kind in _FNW_KINDS else 0.0)
    rows.hashes.append(sample_hash(sample_id))
    rows.emitted_at.append(emitted_at)
    return True


def _scalar_values(features: dict[str, Any]) -> bool:
    return {type(v) for v in features.values()} <= _FEATURE_TYPES


def decode_records(values: Sequence[bytes | None], spec: FeatureSpec) -> SampleColumns:
    """Decode raw `samples` record values into columns; count and skip every bad record.

    A ``None`` value (a tombstone) counts as ``"empty"``. Reason codes are those of
    :class:`stream.errors.BadEventError`, plus ``bad_value:labels.*`` and ``bad_value:masks``.
    """
    rows = _Rows()
    loads = orjson.loads
    for raw in values:
        if raw is None:
            rows.bad["empty"] += 1
            continue
        try:
            obj = loads(raw)
            if not _append_fast(obj, rows):
                _parse_one(obj, rows)
        except orjson.JSONDecodeError:
            rows.bad["invalid_json"] += 1
        except BadEventError as exc:
            rows.bad[exc.reason] += 1
    return rows.columns(spec)


def decode_records_naive(values: Sequence[bytes | None], spec: FeatureSpec) -> SampleColumns:
    """Reference path: `stream.events.decode_sample` per record, then the same label checks.

    Slower (it builds a `Sample` per record); the benchmark's baseline and the unit tests'
    reference for :func:`decode_records`.
    """
    rows = _Rows()
    for raw in values:
        if raw is None:
            rows.bad["empty"] += 1
            continue
        try:
            sample = decode_sample(raw)
            m = sample.masks
            mask_row = (m.ctr, m.cvr, m.ctcvr, m.ysl)
            label_row = (sample.labels.click, sample.labels.conversion, sample.labels.ysl)
            _check_labels(*label_row, mask_row)
        except BadEventError as exc:
            rows.bad[exc.reason] += 1
            continue
        except TypeError:  # Sample.from_dict raises it on an unhashable "kind" (a list)
            rows.bad["bad_value:kind"] += 1
            continue
        rows.features.append(sample.features)
        rows.labels.append(label_row)
        rows.masks.append(mask_row)
        rows.fnw.append(1.0 if sample.kind in _FNW_KINDS else 0.0)
        rows.hashes.append(sample_hash(sample.sample_id))
        rows.emitted_at.append(sample.emitted_at)
    return rows.columns(spec)


# --- dedupe -------------------------------------------------------------------------------------


class Deduper:
    """Drops sample ids seen among the last `horizon` distinct ids let through (FIFO eviction).

    `checksum` is the sum mod 2**64 of every hash let through: two runs trained the same
    multiset of samples iff (with overwhelming probability) their checksums match, which is
    how the restart tests prove nothing was skipped or trained twice.
    """

    def __init__(self, horizon: int) -> None:
        if horizon < 0:
            raise ValueError(f"dedupe horizon must be >= 0, got {horizon}")
        self.horizon = horizon
        self._seen: set[int] = set()
        self._order: deque[int] = deque()
        self.checksum = 0  # sum of passed hashes mod 2**64
        self.passed = 0  # samples let through
        self.dropped = 0  # duplicates dropped

    def __len__(self) -> int:
        return len(self._order)

    def filter(self, hashes: NDArray[np.uint64]) -> NDArray[np.bool_]:
        """Return a keep mask (N,): false for ids within the horizon or earlier in `hashes`."""
        keep = np.ones(hashes.shape[0], dtype=np.bool_)
        if self.horizon == 0:
            self._count(hashes, keep)
            return keep
        seen, order = self._seen, self._order
        for i, h in enumerate(hashes.tolist()):
            if h in seen:
                keep[i] = False
            else:
                seen.add(h)
                order.append(h)
        while len(order) > self.horizon:
            seen.discard(order.popleft())
        self._count(hashes, keep)
        return keep

    def _count(self, hashes: NDArray[np.uint64], keep: NDArray[np.bool_]) -> None:
        n_keep = int(keep.sum())
        self.passed += n_keep
        self.dropped += int(keep.shape[0]) - n_keep
        # the array sum wraps modulo 2**64 by itself; Python ints keep the running total exact
        self.checksum = (self.checksum + int(hashes[keep].sum(dtype=np.uint64))) % _U64

    def state(self) -> tuple[NDArray[np.uint64], dict[str, int]]:
        """Return the remembered hashes (oldest first) and the counters, for a checkpoint."""
        hashes = np.fromiter(self._order, dtype=np.uint64, count=len(self._order))
        counters = {"checksum": self.checksum, "passed": self.passed, "dropped": self.dropped}
        return hashes, counters

    def load_state(self, hashes: NDArray[np.uint64], counters: Mapping[str, int]) -> None:
        """Restore `state()` output; only the newest `horizon` hashes are kept."""
        kept = hashes.tolist()[-self.horizon :] if self.horizon else []
        self._order = deque(kept)
        self._seen = set(kept)
        self.checksum = int(counters.get("checksum", 0)) % _U64
        self.passed = int(counters.get("passed", 0))
        self.dropped = int(counters.get("dropped", 0))
