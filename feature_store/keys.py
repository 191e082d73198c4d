"""Every Redis key mtlstream uses, built by pure functions under one namespace prefix.

Layout (namespace ``mtl:`` by default; ``{id}``, ``{name}``, ``{process}`` are validated parts,
``{version}`` a positive integer):

======================================  ==========  ================================================
key                                     type        content
======================================  ==========  ================================================
``mtl:feat:user:{id}``                  hash        feature name -> JSON value; ``_ts`` = event time
                                                    (epoch ms) of the newest applied row; TTL opt.
``mtl:feat:item:{id}``                  hash        same, plus the live counters written by the
                                                    stream (``item_imp_1h``, ``item_clk_1h``,
                                                    ``item_ctr_1h``) guarded by ``_ts:counters``
``mtl:cnt:item:{id}``                   hash        counter buckets: ``imp:{start_ms}`` and
                                                    ``clk:{start_ms}`` -> count; TTL = window
``mtl:model:{name}:v:{version}``        string      snapshot blob: safetensors weights
``mtl:model:{name}:meta:{version}``     hash        JSON values: model_args, feature_spec, step,
                                                    metrics, offsets, sha256, created_at, version
``mtl:model:{name}:latest``             string      current version, flipped in the same MULTI as
                                                    the blob write (or by a rollback)
``mtl:model:{name}:versions``           zset        stored versions, score = member = version
``mtl:model:{name}:seq``                string      version counter (INCR); never decreases
``mtl:model:{name}:updates``            pub/sub     channel: a version number each time ``latest``
                                                    flips
``mtl:health:{process}``                string      one ``key=value`` status line with a TTL
======================================  ==========  ================================================

Fields whose name starts with ``_`` are metadata (event-time guards), never features. Parts are
checked so that one key can never be read as another: no ``:`` (the separator), no whitespace or
control characters, no glob characters (``* ? [ ] \\``, so SCAN patterns stay exact) and no
``{ }`` (Redis Cluster hash tags stay ours to add).

Examples
--------
>>> keys = KeySpace()
>>> keys.user_features("u42")
'mtl:feat:user:u42'
>>> keys.model_blob("ple", 7)
'mtl:model:ple:v:7'
>>> KeySpace(namespace="test:").model_updates("ple")
'test:model:ple:updates'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from feature_store.errors import InvalidKeyPartError

__all__ = [
    "COUNTERS_TS_FIELD",
    "DEFAULT_NAMESPACE",
    "MAX_PART_BYTES",
    "TS_FIELD",
    "Entity",
    "KeySpace",
    "check_part",
]

#: Prefix of every key unless a deployment (or a test) picks another.
DEFAULT_NAMESPACE = "mtl:"
#: Longest id or name accepted, in UTF-8 bytes (Redis allows far more; ids this long are a bug).
MAX_PART_BYTES = 256
#: Hash field holding the event time (epoch ms) of the newest applied feature row.
TS_FIELD = "_ts"
#: Hash field guarding the stream's live counters in an item hash. A separate guard (as Feast's
#: ``_ts:{feature_view}``) so a catalog row older than the last counter update still applies.
COUNTERS_TS_FIELD = "_ts:counters"

Entity = Literal["user", "item"]
_ENTITIES: frozenset[str] = frozenset({"user", "item"})

# ':' separates parts; glob characters would make SCAN patterns match other keys; braces are
# Redis Cluster hash tags. Whitespace and control characters are caught by isprintable/isspace.
_FORBIDDEN = re.compile(r"[:{}*?\[\]\\\s]")


def check_part(value: str, what: str = "id", max_bytes: int = MAX_PART_BYTES) -> str:
    """Return ``value`` if it can be one part of a key, else raise :class:`InvalidKeyPartError`.

    Examples
    --------
    >>> check_part("item-7")
    'item-7'
    >>> check_part("a:b")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    feature_store.errors.InvalidKeyPartError: id 'a:b' holds a character not allowed in a key ...
    """
    if not isinstance(value, str):
        raise InvalidKeyPartError(f"{what} must be a str, got {type(value).__name__}")
    if not value:
        raise InvalidKeyPartError(f"{what} is empty")
    size = len(value.encode("utf-8"))
    if size > max_bytes:
        raise InvalidKeyPartError(f"{what} is {size} bytes, over the limit of {max_bytes}")
    if not value.isprintable() or _FORBIDDEN.search(value):
        raise InvalidKeyPartError(
            f"{what} {value!r} holds a character not allowed in a key "
            "(':', '{', '}', '*', '?', '[', ']', '\\\\', whitespace or control)"
        )
    return value


def _check_version(version: int) -> int:
    """Return ``version`` if it is a positive int (bools rejected), else raise."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidKeyPartError(f"version must be a positive int, got {version!r}")
    return version


@dataclass(frozen=True)
class KeySpace:
    """Builds every key of the layout under one namespace; methods are pure string builders."""

    # prefix of every key and channel; must end with ':' (e.g. "mtl:", or a test's "t1a2b:")
    namespace: str = DEFAULT_NAMESPACE
    # longest id / name / process part accepted, in UTF-8 bytes
    max_part_bytes: int = MAX_PART_BYTES

    def __post_init__(self) -> None:
        """Check the namespace: non-empty, ends with ':', every part between ':' a valid part."""
        if not self.namespace.endswith(":"):
            raise InvalidKeyPartError(f"namespace {self.namespace!r} must end with ':'")
        for part in self.namespace[:-1].split(":"):
            check_part(part, "namespace part", self.max_part_bytes)
        if self.max_part_bytes < 1:
            raise ValueError(f"max_part_bytes must be >= 1, got {self.max_part_bytes}")

    def _part(self, value: str, what: str) -> str:
        return check_part(value, what, self.max_part_bytes)

    def features(self, entity: Entity, entity_id: str) -> str:
        """Key of an entity's feature hash: ``mtl:feat:{entity}:{id}``."""
        if entity not in _ENTITIES:
            raise InvalidKeyPartError(f"entity must be one of {sorted(_ENTITIES)}, got {entity!r}")
        return f"{self.namespace}feat:{entity}:{self._part(entity_id, f'{entity} id')}"

    def user_features(self, user_id: str) -> str:
        """Key of a user's feature hash: ``mtl:feat:user:{id}``."""
        return self.features("user", user_id)

    def item_features(self, item_id: str) -> str:
        """Key of an item's feature hash: ``mtl:feat:item:{id}``."""
        return self.features("item", item_id)

    def item_counters(self, item_id: str) -> str:
        """Key of an item's counter buckets: ``mtl:cnt:item:{id}``."""
        return f"{self.namespace}cnt:item:{self._part(item_id, 'item id')}"

    def _model(self, name: str) -> str:
        return f"{self.namespace}model:{self._part(name, 'model name')}"

    def model_blob(self, name: str, version: int) -> str:
        """Key of a snapshot's safetensors blob: ``mtl:model:{name}:v:{version}``."""
        return f"{self._model(name)}:v:{_check_version(version)}"

    def model_meta(self, name: str, version: int) -> str:
        """Key of a snapshot's metadata hash: ``mtl:model:{name}:meta:{version}``."""
        return f"{self._model(name)}:meta:{_check_version(version)}"

    def model_latest(self, name: str) -> str:
        """Key holding the current version: ``mtl:model:{name}:latest``."""
        return f"{self._model(name)}:latest"

    def model_versions(self, name: str) -> str:
        """Sorted set of stored versions: ``mtl:model:{name}:versions``."""
        return f"{self._model(name)}:versions"

    def model_seq(self, name: str) -> str:
        """Version counter, INCR'd once per publish: ``mtl:model:{name}:seq``."""
        return f"{self._model(name)}:seq"

    def model_updates(self, name: str) -> str:
        """Pub/sub channel announcing each flip of ``latest``: ``mtl:model:{name}:updates``."""
        return f"{self._model(name)}:updates"

    def health(self, process: str) -> str:
        """Health key of a daemon (learner, stream worker, scorer): ``mtl:health:{process}``."""
        return f"{self.namespace}health:{self._part(process, 'process name')}"
