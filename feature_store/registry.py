"""Versioned model snapshots in Redis: publish, load with a sha256 check, prune, roll back, watch.

A snapshot is a safetensors blob plus a metadata hash whose values are JSON (never pickle):
``model_args``, ``feature_spec``, ``step``, ``metrics``, ``offsets`` as the learner passes them,
and ``sha256`` (of the blob), ``created_at`` (epoch ms) and ``version``, set here. Publishing
takes a version from a counter (INCR), then in one MULTI writes the blob and the metadata, adds
the version to the versions set, flips ``latest`` and announces the version on the updates
channel. ``latest`` is WATCHed, so of two racing publishers the higher version ends up latest
(as arq's ``enqueue_job`` WATCHes its job key). Versions beyond the newest ``keep`` are pruned,
never the one ``latest`` points at.

Readers (the scorer) follow ``latest`` with :meth:`AsyncSnapshotRegistry.updates`: pub/sub wakes
them at once, and a poll every few seconds catches what pub/sub drops (it is fire-and-forget:
a reader that was disconnected misses messages).

Examples
--------
>>> import numpy as np, safetensors.numpy
>>> blob = safetensors.numpy.save({"w": np.zeros(2, dtype=np.float32)})
>>> fields = encode_meta({"step": 10}, blob, version=3, created_at_ms=1_000)
>>> sorted(fields)
['created_at', 'sha256', 'step', 'version']
>>> snapshot_from_parts("ple", 3, blob, fields).meta["step"]
10
>>> versions_to_prune([1, 2, 3, 4, 5], latest=2, keep=2)
[1, 3]
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import orjson
import redis
import redis.asyncio
from redis.asyncio.client import PubSub
from redis.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError
from redis.typing import EncodableT, FieldT

from feature_store.errors import (
    CorruptSnapshotError,
    PublishConflictError,
    SnapshotNotFoundError,
)
from feature_store.keys import DEFAULT_NAMESPACE, KeySpace, check_part
from feature_store.store import Flow, RawHash, Step, arun_flow, as_keyspace, run_flow, text

__all__ = [
    "DEFAULT_KEEP",
    "DEFAULT_MODEL",
    "RESERVED_META",
    "AsyncSnapshotRegistry",
    "Snapshot",
    "SnapshotRegistry",
    "check_safetensors",
    "decode_meta",
    "encode_meta",
    "encode_user_meta",
    "latest_flow",
    "load_flow",
    "parse_version",
    "parse_versions",
    "sha256_hex",
    "snapshot_from_parts",
    "versions_flow",
    "versions_to_prune",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Model name used when none is given (the PLE ranker).
DEFAULT_MODEL = "ple"
#: Snapshots kept by default: enough to roll back a few bad publishes.
DEFAULT_KEEP = 5
#: Metadata keys the registry fills in itself.
RESERVED_META = frozenset({"sha256", "created_at", "version"})

_JSON_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
# pub/sub and polling must outlive Redis restarts; anything else is a bug and propagates
_TRANSIENT = (RedisConnectionError, RedisTimeoutError)


@dataclass(frozen=True)
class Snapshot:
    """A loaded snapshot: its version, safetensors weights and decoded metadata."""

    version: int
    # safetensors bytes, already checked against meta["sha256"]
    weights: bytes
    # JSON-decoded metadata: model_args, feature_spec, step, metrics, offsets, sha256, ...
    meta: dict[str, Any]


# --- pure helpers -------------------------------------------------------------------------------


def sha256_hex(blob: bytes) -> str:
    """Hex sha256 of a blob."""
    return hashlib.sha256(blob).hexdigest()


def check_safetensors(blob: bytes) -> None:
    """Raise ``ValueError`` unless ``blob`` starts like safetensors (u64 header size + JSON)."""
    if not isinstance(blob, bytes):
        raise ValueError(f"weights must be safetensors bytes, got {type(blob).__name__}")
    size = int.from_bytes(blob[:8], "little") if len(blob) >= 8 else -1
    if size < 2 or 8 + size > len(blob):
        raise ValueError("weights are not safetensors bytes (bad header size); never pickle")
    try:
        header = orjson.loads(blob[8 : 8 + size])
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"weights are not safetensors bytes (header is not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise ValueError("weights are not safetensors bytes (header is not a JSON object)")


def encode_user_meta(meta: Mapping[str, Any]) -> dict[str, bytes]:
    """Encode the caller's metadata: every value JSON (NaN and infinities become null).

    numpy scalars and arrays are accepted; non-str dict keys become strings. ``sha256``,
    ``created_at`` and ``version`` are the registry's and may not be given.
    """
    clash = RESERVED_META.intersection(meta)
    if clash:
        raise ValueError(f"meta keys {sorted(clash)} are set by the registry, not the caller")
    fields: dict[str, bytes] = {}
    for key, value in meta.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"meta keys must be non-empty str, got {key!r}")
        try:
            fields[key] = orjson.dumps(value, option=_JSON_OPTIONS)
        except orjson.JSONEncodeError as exc:
            raise ValueError(f"meta[{key!r}] cannot be stored as JSON: {exc}") from exc
    return fields


def encode_meta(
    meta: Mapping[str, Any], weights: bytes, version: int, created_at_ms: int
) -> dict[str, bytes]:
    """Build the metadata hash: the caller's fields plus ``sha256``, ``created_at``, ``version``."""
    return {**encode_user_meta(meta), **_registry_fields(weights, version, created_at_ms)}


def _registry_fields(weights: bytes, version: int, created_at_ms: int) -> dict[str, bytes]:
    own = {"sha256": sha256_hex(weights), "created_at": created_at_ms, "version": version}
    return {key: orjson.dumps(value) for key, value in own.items()}


def decode_meta(raw: RawHash) -> dict[str, Any]:
    """Decode a metadata hash (HGETALL reply) back to JSON values."""
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            meta[text(key)] = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise CorruptSnapshotError(f"meta field {text(key)!r} is not JSON: {exc}") from exc
    return meta


def parse_version(raw: object) -> int | None:
    """Parse a stored version number (GET reply); ``None`` when the key does not exist."""
    if raw is None:
        return None
    if isinstance(raw, bytes | str | int) and not isinstance(raw, bool):
        return int(raw)
    raise ValueError(f"not a version number: {raw!r}")


def parse_versions(raw: object) -> list[int]:
    """Parse the versions set (ZRANGE reply), oldest first."""
    if not isinstance(raw, list):
        raise ValueError(f"not a list of versions: {raw!r}")
    return sorted(int(v) for v in raw)


def snapshot_from_parts(
    name: str,
    version: int,
    blob: bytes | str | None,
    raw_meta: RawHash,
) -> Snapshot:
    """Check a snapshot's parts as read from Redis and build it, or raise a named error."""
    where = f"model {name!r} version {version}"
    if blob is None and not raw_meta:
        raise SnapshotNotFoundError(f"{where} is not stored (never published, or pruned)")
    if blob is None or not raw_meta:
        missing = "blob" if blob is None else "metadata"
        raise CorruptSnapshotError(f"{where}: the {missing} is missing")
    if isinstance(blob, str):
        raise ValueError("the registry needs a client with decode_responses=False (bytes blobs)")
    meta = decode_meta(raw_meta)
    expected = meta.get("sha256")
    actual = sha256_hex(blob)
    if expected != actual:
        raise CorruptSnapshotError(f"{where}: blob sha256 {actual} != recorded {expected}")
    if meta.get("version") != version:
        raise CorruptSnapshotError(f"{where}: metadata says version {meta.get('version')!r}")
    return Snapshot(version, blob, meta)


def versions_to_prune(versions: list[int], latest: int | None, keep: int) -> list[int]:
    """Versions to delete: all but the newest ``keep`` and the one ``latest`` points at."""
    ordered = sorted(set(versions))
    kept = set(ordered[-keep:]) if keep > 0 else set()
    if latest is not None:
        kept.add(latest)
    return [v for v in ordered if v not in kept]


# --- flows (shared by the sync and async registries) --------------------------------------------


def latest_flow(keys: KeySpace, name: str) -> Flow[int | None]:
    """Read the version ``latest`` points at, ``None`` before the first publish."""
    (raw,) = yield [("GET", keys.model_latest(name))]
    return parse_version(raw)


def versions_flow(keys: KeySpace, name: str) -> Flow[list[int]]:
    """Read the stored versions, oldest first."""
    (raw,) = yield [("ZRANGE", keys.model_versions(name), 0, -1)]
    return parse_versions(raw)


def _parts_step(keys: KeySpace, name: str, version: int) -> Step:
    return [("GET", keys.model_blob(name, version)), ("HGETALL", keys.model_meta(name, version))]


def load_flow(
    keys: KeySpace, name: str, version: int | None = None, tries: int = 3
) -> Flow[Snapshot]:
    """Load a snapshot (the latest when ``version`` is None) and check its sha256.

    Following ``latest`` takes two round trips; a publisher may flip and prune in between, so a
    vanished latest version is re-read a few times before it counts as corruption.
    """
    if version is not None:
        blob, meta = yield _parts_step(keys, name, version)
        return snapshot_from_parts(name, version, blob, meta)
    for tries_left in reversed(range(tries)):
        current = yield from latest_flow(keys, name)
        if current is None:
            raise SnapshotNotFoundError(f"no snapshot of model {name!r} was published")
        blob, meta = yield _parts_step(keys, name, current)
        if blob is not None or meta:
            return snapshot_from_parts(name, current, blob, meta)
        logger.info(
            "model=%s version=%d vanished while loading, %d tries left", name, current, tries_left
        )
    raise CorruptSnapshotError(f"latest of model {name!r} points at a version that is not stored")


# --- clients ------------------------------------------------------------------------------------


class SnapshotRegistry:
    """Publishes, prunes, rolls back and loads snapshots over a sync ``redis.Redis`` (bytes)."""

    def __init__(
        self,
        client: redis.Redis,
        name: str = DEFAULT_MODEL,
        namespace: str | KeySpace = DEFAULT_NAMESPACE,
        keep: int = DEFAULT_KEEP,
        max_tries: int = 10,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if max_tries < 1:
            raise ValueError(f"max_tries must be >= 1, got {max_tries}")
        self.client = client
        self.keys = as_keyspace(namespace)
        self.name = check_part(name, "model name", self.keys.max_part_bytes)
        # versions kept after each publish (plus the one latest points at)
        self.keep = keep
        # attempts of a WATCHed transaction before PublishConflictError
        self.max_tries = max_tries
        # wall clock for created_at (seconds), injectable for tests
        self.clock = clock

    def latest_version(self) -> int | None:
        """Return the version ``latest`` points at, ``None`` before the first publish."""
        return run_flow(self.client, latest_flow(self.keys, self.name))

    def versions(self) -> list[int]:
        """Return the stored versions, oldest first."""
        return run_flow(self.client, versions_flow(self.keys, self.name))

    def load(self, version: int | None = None) -> Snapshot:
        """Load a snapshot (default: the latest), checking its sha256."""
        return run_flow(self.client, load_flow(self.keys, self.name, version))

    def publish(self, weights: bytes, meta: Mapping[str, Any]) -> int:
        """Store a snapshot, make it latest (unless a newer one won a race), announce, prune.

        Parameters
        ----------
        weights
            The model's tensors as safetensors bytes.
        meta
            JSON-able metadata: model_args, feature_spec, step, metrics, offsets, ...

        Returns
        -------
        int
            The new snapshot's version.
        """
        check_safetensors(weights)
        user_fields = encode_user_meta(meta)  # fail before taking a version number
        version = int(self.client.incr(self.keys.model_seq(self.name)))
        fields = {**user_fields, **_registry_fields(weights, version, int(self.clock() * 1000))}
        commit = partial(self._commit, version, weights, fields)
        flipped = self._transact("publish", commit, self.keys.model_latest(self.name))
        logger.info(
            "published model=%s version=%d latest=%s bytes=%d",
            self.name,
            version,
            flipped,
            len(weights),
        )
        try:
            self.prune()
        except PublishConflictError as exc:  # the snapshot is safe; the next publish prunes
            logger.warning("prune skipped: %s", exc)
        return version

    def prune(self) -> list[int]:
        """Delete all versions but the newest ``keep`` and ``latest``; return those deleted."""
        watched = (self.keys.model_latest(self.name), self.keys.model_versions(self.name))
        doomed = self._transact("prune", self._prune, *watched)
        if doomed:
            logger.info("pruned model=%s versions=%s", self.name, doomed)
        return doomed

    def rollback(self, version: int) -> int | None:
        """Point ``latest`` at a stored, intact version and announce it; return the previous one."""
        self.load(version)  # never flip onto a snapshot that would fail its sha256 check
        watched = (
            self.keys.model_blob(self.name, version),
            self.keys.model_meta(self.name, version),
        )
        previous = self._transact("rollback", partial(self._flip, version), *watched)
        logger.info("rolled back model=%s from=%s to=%d", self.name, previous, version)
        return previous

    def _transact(self, what: str, body: Callable[[Pipeline], T], *watch: str) -> T:
        """Run ``body`` in a WATCH/MULTI pipeline, retrying a bounded number of lost races."""
        for tries_left in reversed(range(self.max_tries)):
            with self.client.pipeline(transaction=True) as pipe:
                # redis-py leaves Pipeline.watch untyped; it sends WATCH at once
                send_watch: Callable[..., object] = pipe.watch
                try:
                    send_watch(*watch)
                    return body(pipe)
                except WatchError:
                    logger.info(
                        "%s model=%s lost a race, %d tries left", what, self.name, tries_left
                    )
        raise PublishConflictError(f"{what} of model {self.name!r} lost {self.max_tries} races")

    def _commit(
        self, version: int, weights: bytes, fields: dict[str, bytes], pipe: Pipeline
    ) -> bool:
        latest_key = self.keys.model_latest(self.name)
        current = parse_version(pipe.get(latest_key))
        flip = current is None or current < version
        pipe.multi()
        pipe.set(self.keys.model_blob(self.name, version), weights)
        payload: dict[FieldT, EncodableT] = {k: v for k, v in fields.items()}
        pipe.hset(self.keys.model_meta(self.name, version), mapping=payload)
        pipe.zadd(self.keys.model_versions(self.name), {str(version): version})
        if flip:
            # PUBLISH inside the MULTI: announced if and only if the flip commits
            pipe.set(latest_key, version)
            pipe.publish(self.keys.model_updates(self.name), version)
        pipe.execute()
        return flip

    def _prune(self, pipe: Pipeline) -> list[int]:
        versions_key = self.keys.model_versions(self.name)
        stored = parse_versions(pipe.zrange(versions_key, 0, -1))
        doomed = versions_to_prune(
            stored, parse_version(pipe.get(self.keys.model_latest(self.name))), self.keep
        )
        pipe.multi()
        for v in doomed:
            pipe.delete(self.keys.model_blob(self.name, v), self.keys.model_meta(self.name, v))
        if doomed:
            pipe.zrem(versions_key, *[str(v) for v in doomed])
        pipe.execute()
        return doomed

    def _flip(self, version: int, pipe: Pipeline) -> int | None:
        blob_key = self.keys.model_blob(self.name, version)
        if pipe.exists(blob_key, self.keys.model_meta(self.name, version)) != 2:
            raise SnapshotNotFoundError(f"model {self.name!r} version {version} was just pruned")
        latest_key = self.keys.model_latest(self.name)
        previous = parse_version(pipe.get(latest_key))
        pipe.multi()
        pipe.set(latest_key, version)
        pipe.publish(self.keys.model_updates(self.name), version)
        pipe.execute()
        return previous


class AsyncSnapshotRegistry:
    """Reads and follows snapshots over a ``redis.asyncio.Redis`` (bytes), for the scorer."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        name: str = DEFAULT_MODEL,
        namespace: str | KeySpace = DEFAULT_NAMESPACE,
    ) -> None:
        self.client = client
        self.keys = as_keyspace(namespace)
        self.name = check_part(name, "model name", self.keys.max_part_bytes)
        # set while Redis is unreachable, so an outage logs one warning, not one per poll
        self._failing = False

    async def latest_version(self) -> int | None:
        """Return the version ``latest`` points at, ``None`` before the first publish."""
        return await arun_flow(self.client, latest_flow(self.keys, self.name))

    async def versions(self) -> list[int]:
        """Return the stored versions, oldest first."""
        return await arun_flow(self.client, versions_flow(self.keys, self.name))

    async def load(self, version: int | None = None) -> Snapshot:
        """Load a snapshot (default: the latest), checking its sha256."""
        return await arun_flow(self.client, load_flow(self.keys, self.name, version))

    async def updates(self, poll_interval_s: float = 5.0) -> AsyncGenerator[int, None]:
        """Yield the latest version now, then each time it changes (publish or rollback).

        Announcements wake the iterator at once; ``latest`` is re-read every ``poll_interval_s``
        anyway, so a dropped announcement or a Redis outage delays an update, never loses it.
        Close it with ``contextlib.aclosing`` to release its pub/sub connection.
        """
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be > 0, got {poll_interval_s}")
        last: int | None = None
        pubsub = self.client.pubsub()
        subscribed = False
        try:
            while True:
                # subscribe before reading latest, so a flip in between still wakes us
                subscribed = subscribed or await self._subscribe(pubsub)
                current = await self._poll_latest()
                if current is not None and current != last:
                    last = current
                    yield current
                subscribed = await self._wait(pubsub, subscribed, poll_interval_s)
        finally:
            # redis-py leaves PubSub.aclose untyped; it unsubscribes and frees the connection
            close: Callable[[], Awaitable[None]] = pubsub.aclose
            await close()

    def _trouble(self, what: str, exc: Exception) -> None:
        """Log an outage once at WARNING, then at DEBUG until Redis answers again."""
        level = logging.DEBUG if self._failing else logging.WARNING
        logger.log(level, "%s model=%s failed, polling on: %s", what, self.name, exc)
        self._failing = True

    async def _subscribe(self, pubsub: PubSub) -> bool:
        try:
            await pubsub.subscribe(self.keys.model_updates(self.name))
        except _TRANSIENT as exc:
            self._trouble("subscribe", exc)
            return False
        return True

    async def _poll_latest(self) -> int | None:
        try:
            current = await self.latest_version()
        except _TRANSIENT as exc:
            self._trouble("reading latest", exc)
            return None
        if self._failing:
            logger.info("reading latest model=%s works again", self.name)
            self._failing = False
        return current

    async def _wait(self, pubsub: PubSub, subscribed: bool, timeout_s: float) -> bool:
        """Wait for an announcement or the poll timeout; return whether still subscribed."""
        if not subscribed:
            await asyncio.sleep(timeout_s)
            return False
        try:
            await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout_s)
        except _TRANSIENT as exc:
            self._trouble("announcements", exc)
            await asyncio.sleep(timeout_s)
            return False
        return True
