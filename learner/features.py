"""Feature spec, stable hashing and the input encoder (embeddings + online dense normalisation).

The `FeatureSpec` travels with each snapshot as plain JSON, so the scorer rebuilds exactly the
inputs the learner trained on: `encode_rows` turns untrusted flat feature mappings into a
categorical index matrix and a dense matrix, and `InputEncoder` turns those into one vector
per row.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from learner.errors import ConfigError, InputShapeError

__all__ = [
    "MISSING_BUCKET",
    "CategoricalField",
    "EncodedBatch",
    "FeatureSpec",
    "InputEncoder",
    "RunningNorm",
    "default_feature_spec",
    "dense_value",
    "encode_rows",
    "hash_bucket",
]

MISSING_BUCKET = 0
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_NAN = float("nan")


@dataclass(frozen=True)
class CategoricalField:
    """One hashed categorical feature: `buckets` embedding rows of size `dim`."""

    name: str  # key in the flat feature mapping
    buckets: int  # hash space incl. bucket 0 (missing); must be >= 2
    dim: int  # embedding size

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"categorical field name must be a non-empty str, got {self.name!r}")
        if not isinstance(self.buckets, int) or self.buckets < 2:
            raise ConfigError(
                f"field {self.name!r}: buckets must be an int >= 2, got {self.buckets!r}"
            )
        if not isinstance(self.dim, int) or self.dim < 1:
            raise ConfigError(f"field {self.name!r}: dim must be an int >= 1, got {self.dim!r}")


@dataclass(frozen=True)
class FeatureSpec:
    """The model's inputs: hashed categorical fields and dense (float) feature names."""

    categorical: list[CategoricalField] = field(default_factory=list)
    dense: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = [f.name for f in self.categorical] + list(self.dense)
        if any(not isinstance(n, str) or not n for n in self.dense):
            raise ConfigError(f"dense feature names must be non-empty str, got {self.dense!r}")
        if len(set(names)) != len(names):
            raise ConfigError(f"feature names must be unique, got {names!r}")

    def to_dict(self) -> dict[str, Any]:
        """Return the spec as a plain JSON-serialisable dict."""
        return {
            "categorical": [
                {"name": f.name, "buckets": f.buckets, "dim": f.dim} for f in self.categorical
            ],
            "dense": list(self.dense),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureSpec:
        """Rebuild a spec from `to_dict()` output, rejecting unknown keys."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"feature spec must be a mapping, got {type(data).__name__}")
        unknown = set(data) - {"categorical", "dense"}
        if unknown:
            raise ConfigError(f"unknown feature spec keys {sorted(unknown)}")
        try:
            cats = [CategoricalField(**dict(f)) for f in data.get("categorical", [])]
        except TypeError as exc:
            raise ConfigError(f"bad categorical field in feature spec: {exc}") from exc
        return cls(categorical=cats, dense=list(data.get("dense", [])))


def default_feature_spec(
    id_buckets: int = 2**18, id_dim: int = 16, small_buckets: int = 2**10, small_dim: int = 8
) -> FeatureSpec:
    """Return the spec for the simulator's feature names (see the features brief).

    Examples
    --------
    >>> spec = default_feature_spec()
    >>> [f.name for f in spec.categorical]
    ['user_id', 'item_id', 'user_segment', 'item_category']
    >>> spec.dense
    ['user_activity', 'item_price', 'item_age_h', 'item_ctr_1h']
    """
    return FeatureSpec(
        categorical=[
            CategoricalField("user_id", id_buckets, id_dim),
            CategoricalField("item_id", id_buckets, id_dim),
            CategoricalField("user_segment", small_buckets, small_dim),
            CategoricalField("item_category", small_buckets, small_dim),
        ],
        dense=["user_activity", "item_price", "item_age_h", "item_ctr_1h"],
    )


def _category_key(value: object) -> str | None:
    """Canonical string of a categorical value, None when it counts as missing.

    Ints and integral floats share a key (42, 42.0 and "42" hash alike) because JSON
    producers disagree on whether ids are numbers or strings.
    """
    if isinstance(value, str):
        return value or None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | np.integer):
        try:
            return str(int(value))
        except ValueError:  # more digits than int->str allows
            return None
    if isinstance(value, float | np.floating):
        number = float(value)
        if not math.isfinite(number):
            return None
        return str(int(number)) if number.is_integer() else repr(number)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace") or None
    return None


@lru_cache(maxsize=2**16)  # ids repeat within and across batches
def _hash_key(field_name: str, key: str, buckets: int) -> int:
    # blake2b, not hash(): Python salts str hashes per process (PYTHONHASHSEED).
    digest = hashlib.blake2b(f"{field_name}\x1f{key}".encode(), digest_size=8).digest()
    return 1 + int.from_bytes(digest, "little") % (buckets - 1)


def hash_bucket(field_name: str, value: object, buckets: int) -> int:
    """Map a categorical value to a bucket in [1, buckets), or 0 when missing.

    Stable across processes, machines and Python versions (blake2b of ``field\\x1fvalue``).

    Examples
    --------
    >>> hash_bucket("item_id", None, 1024)
    0
    >>> hash_bucket("item_id", 42, 1024) == hash_bucket("item_id", "42", 1024)
    True
    """
    if buckets < 2:
        raise ValueError(f"buckets must be >= 2, got {buckets}")
    key = _category_key(value)
    if key is None:
        return MISSING_BUCKET
    return _hash_key(field_name, key, buckets)


def dense_value(value: object) -> float:
    """Float of a dense value; NaN for missing or non-numeric values.

    The conversion `encode_rows` applies to every dense feature (the scorer's columnar encoder
    uses it too, so both agree exactly).

    Examples
    --------
    >>> dense_value("2.5"), dense_value(3)
    (2.5, 3.0)
    >>> import math; math.isnan(dense_value(None)), math.isnan(dense_value("n/a"))
    (True, True)
    """
    if isinstance(value, float):
        return value
    if isinstance(value, int | np.integer | np.floating):
        try:
            return float(value)
        except OverflowError:
            return _NAN
    if isinstance(value, str | bytes):
        # Redis hashes hand back every value as a string.
        try:
            return float(value)
        except (ValueError, OverflowError):
            return _NAN
    return _NAN


@dataclass(frozen=True)
class EncodedBatch:
    """Rows encoded for the model: `cat` int64 (B, Fc) and `dense` float32 (B, Fd, NaN=missing)."""

    cat: NDArray[np.int64]  # (B, Fc)
    dense: NDArray[np.float32]  # (B, Fd)

    def __len__(self) -> int:
        return int(self.cat.shape[0])

    def to_tensors(self, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """Return `(cat, dense)` as torch tensors (zero-copy on CPU)."""
        cat = torch.from_numpy(self.cat)
        dense = torch.from_numpy(self.dense)
        if device is not None:
            cat, dense = cat.to(device), dense.to(device)
        return cat, dense


def _as_mapping(row: object) -> Mapping[str, object]:
    """Return `row`, or an empty mapping when it is not one (an all-missing row)."""
    # dict first: it is what JSON gives us, and the Mapping ABC check is slower.
    return row if isinstance(row, dict | Mapping) else {}


def encode_rows(spec: FeatureSpec, rows: Sequence[Mapping[str, object]]) -> EncodedBatch:
    """Encode flat feature mappings into index and dense arrays; never raises on bad values.

    Missing keys, None, garbage types and non-finite numbers become bucket 0 (categorical)
    or NaN (dense); unknown extra keys are ignored; a row that is not a mapping is all-missing.

    Examples
    --------
    >>> spec = FeatureSpec([CategoricalField("item_id", 16, 4)], ["price"])
    >>> enc = encode_rows(spec, [{"item_id": "a", "price": 2}, {"price": "oops", "x": 1}])
    >>> enc.cat.shape, enc.dense.dtype
    ((2, 1), dtype('float32'))
    >>> int(enc.cat[1, 0]), bool(np.isnan(enc.dense[1, 0]))
    (0, True)
    """
    safe_rows = [_as_mapping(row) for row in rows]
    n_rows = len(safe_rows)
    cat = np.zeros((n_rows, len(spec.categorical)), dtype=np.int64)
    for j, cf in enumerate(spec.categorical):
        name, buckets = cf.name, cf.buckets
        cat[:, j] = np.fromiter(
            (hash_bucket(name, row.get(name), buckets) for row in safe_rows),
            dtype=np.int64,
            count=n_rows,
        )
    dense64 = np.empty((n_rows, len(spec.dense)), dtype=np.float64)
    for j, name in enumerate(spec.dense):
        dense64[:, j] = np.fromiter(
            (dense_value(row.get(name)) for row in safe_rows), dtype=np.float64, count=n_rows
        )
    # Values outside float32 range would overflow to inf (and warn) on the cast.
    bad = ~np.isfinite(dense64)
    bad |= np.abs(np.where(bad, 0.0, dense64)) > _FLOAT32_MAX
    dense64[bad] = np.nan
    return EncodedBatch(cat=cat, dense=dense64.astype(np.float32))


class RunningNorm(nn.Module):
    """Online per-feature standardisation with NaN as missing (-> 0 after normalising).

    Statistics are merged batch by batch (Chan et al.'s parallel Welford update) only in
    train mode, in float64 so long streams do not lose precision. With `max_count`, the old
    statistics never weigh more than `max_count` samples, so they track drift.

    Call Args: x (B, F) float, NaN = missing.  Returns: (B, F) float, clipped to +-clip.
    """

    count: Tensor
    mean: Tensor
    var: Tensor

    def __init__(
        self, n_features: int, eps: float = 1e-5, clip: float = 10.0, max_count: float | None = None
    ) -> None:
        super().__init__()
        self.eps = eps
        self.clip = clip
        self.max_count = max_count
        self.register_buffer("count", torch.zeros(n_features, dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(n_features, dtype=torch.float64))
        self.register_buffer("var", torch.ones(n_features, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Merge the non-NaN values of a (B, F) batch into the running statistics."""
        x = x.detach().to(torch.float64)  # (B, F)
        valid = ~torch.isnan(x)  # (B, F)
        n_b = valid.sum(0).to(torch.float64)  # (F,)
        safe_n_b = n_b.clamp(min=1.0)
        mean_b = torch.where(valid, x, 0.0).sum(0) / safe_n_b  # (F,)
        m2_b = torch.where(valid, (x - mean_b).square(), 0.0).sum(0)  # (F,)
        n_a = self.count if self.max_count is None else self.count.clamp(max=self.max_count)
        n = n_a + n_b
        safe_n = n.clamp(min=1.0)
        delta = mean_b - self.mean
        mean = self.mean + delta * n_b / safe_n
        m2 = self.var * n_a + m2_b + delta.square() * n_a * n_b / safe_n
        has = n_b > 0  # features with no value in this batch keep their statistics
        self.mean.copy_(torch.where(has, mean, self.mean))
        self.var.copy_(torch.where(has, m2 / safe_n, self.var))
        self.count.copy_(torch.where(has, n, self.count))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.update(x)
        scale = torch.rsqrt(self.var + self.eps).to(x.dtype)  # (F,)
        z = (x - self.mean.to(x.dtype)) * scale  # (B, F)
        z = torch.where(torch.isnan(z), 0.0, z)
        return z.clamp(-self.clip, self.clip)


class InputEncoder(nn.Module):
    """Embeddings per categorical field + `RunningNorm` dense features, concatenated.

    Call Args: cat (B, Fc) int64 buckets, dense (B, Fd) float with NaN = missing.
    Returns: (B, out_dim) with out_dim = sum(dims) + Fd * (2 if missing_indicator else 1).
    """

    def __init__(
        self,
        spec: FeatureSpec,
        missing_indicator: bool = True,
        clip: float = 10.0,
        max_count: float | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.missing_indicator = missing_indicator
        # Bucket 0 (missing) keeps a trainable row: "missing" is informative.
        embeddings = [nn.Embedding(f.buckets, f.dim) for f in spec.categorical]
        for emb in embeddings:
            nn.init.normal_(emb.weight, std=0.05)
        self.embeddings = nn.ModuleList(embeddings)
        self.norm = RunningNorm(len(spec.dense), clip=clip, max_count=max_count)
        n_dense = len(spec.dense) * (2 if missing_indicator else 1)
        self.out_dim = sum(f.dim for f in spec.categorical) + n_dense

    def _check(self, cat: Tensor, dense: Tensor) -> None:
        fc, fd = len(self.spec.categorical), len(self.spec.dense)
        if cat.dim() != 2 or cat.shape[1] != fc or dense.dim() != 2 or dense.shape[1] != fd:
            raise InputShapeError(
                f"inputs cat {tuple(cat.shape)} / dense {tuple(dense.shape)} do not match the "
                f"feature spec (B, {fc}) / (B, {fd})"
            )
        if cat.shape[0] != dense.shape[0]:
            raise InputShapeError(
                f"batch sizes differ: cat {cat.shape[0]} vs dense {dense.shape[0]}"
            )

    def forward(self, cat: Tensor, dense: Tensor) -> Tensor:
        self._check(cat, dense)
        parts = [emb(cat[:, j]) for j, emb in enumerate(self.embeddings)]  # Fc x (B, d_j)
        parts.append(self.norm(dense))  # (B, Fd)
        if self.missing_indicator:
            parts.append(torch.isnan(dense).to(parts[-1].dtype))  # (B, Fd)
        return torch.cat(parts, dim=1)  # (B, out_dim)
