"""The scorer's feature reads: one Redis round trip per request, defaults while Redis is away.

Reads run :func:`feature_store.store.read_columns_flow` (one HMGET per entity, one round trip)
over :class:`feature_store.pipe.RawPipeline` and give the values field by field
(:class:`~feature_store.store.FieldColumns`), the form the scorer's encoder takes. When a read
fails the request is scored with default features (never a 5xx), Redis is marked down, and until
a probe succeeds requests skip it instead of each waiting for a timeout. ``/health`` answers 503
meanwhile.

Optionally (``MTL_SERVE_ITEM_CACHE_S`` > 0, off by default) item rows are kept for that many
seconds in an :class:`ItemCache`: a request then reads the user and only the items not cached,
still in one round trip. Item features may then be up to that old (the live counters are
batched by the stream for about as long anyway); the impression log records the values used.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from feature_store.pipe import RawPipeline
from feature_store.store import (
    AsyncFeatureStore,
    FeatureRow,
    FeatureValue,
    FieldColumns,
    FieldRows,
    decode_row,
    read_columns_flow,
)
from serving.metrics import ServingMetrics

__all__ = ["FeatureReader", "ItemCache", "RedisHealth", "fields_of_rows"]

logger = logging.getLogger(__name__)

#: What a lost or hung Redis raises through redis-py (OSError: a socket error it did not wrap).
TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError)


class RedisHealth:
    """Whether the feature store answers; flips down on a failed read, up on a good probe."""

    def __init__(self, client: redis.asyncio.Redis, metrics: ServingMetrics) -> None:
        self.client = client
        self.metrics = metrics
        self.up = False
        self.since = time.monotonic()

    def _set(self, up: bool, why: object = None) -> None:
        if up != self.up:
            logger.log(
                logging.INFO if up else logging.WARNING,
                "redis=%s after %.1fs%s",
                "up" if up else "down",
                time.monotonic() - self.since,
                "" if why is None else f": {why}",
            )
            self.up, self.since = up, time.monotonic()
        self.metrics.redis_up.set(1 if up else 0)

    def mark_down(self, exc: BaseException) -> None:
        """Record a failed read: requests skip Redis until a probe succeeds."""
        self.metrics.redis_errors.inc()
        self._set(False, exc)

    async def probe(self) -> bool:
        """PING Redis; update and return the state."""
        try:
            await self.client.ping()
        except TRANSIENT as exc:
            if self.up:
                self.mark_down(exc)
            return False
        self._set(True)
        return True

    async def run(self, interval_s: float) -> None:
        """Probe every ``interval_s`` forever (cancel to stop)."""
        while True:
            await self.probe()
            await asyncio.sleep(interval_s)


def fields_of_rows(
    fields: Sequence[str], user: FeatureRow | None, items: Sequence[FeatureRow | None]
) -> FieldRows:
    """Project whole decoded hashes (HGETALL) onto ``fields``, as ``read_fields`` returns them."""

    def project(row: FeatureRow | None) -> list[FeatureValue | None] | None:
        if row is None:
            return None
        values = [row.features.get(f) for f in fields]
        return values if any(v is not None for v in values) else None

    return FieldRows(tuple(fields), project(user), [project(r) for r in items])


Row = list[FeatureValue | None] | None


class ItemCache:
    """Item rows by id for ``ttl_s`` seconds, for one set of fields at a time (a model's)."""

    def __init__(
        self,
        ttl_s: float,
        max_items: int = 200_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s <= 0 or max_items < 1:
            raise ValueError(f"need ttl_s > 0 and max_items >= 1, got {ttl_s}, {max_items}")
        self.ttl_s = ttl_s
        self.max_items = max_items
        self.clock = clock
        self._fields: tuple[str, ...] = ()
        self._rows: dict[str, tuple[float, Row]] = {}

    def lookup(
        self, fields: tuple[str, ...], item_ids: Sequence[str]
    ) -> tuple[list[Row], list[str]]:
        """Return the cached rows (a miss is ``None`` too) and the ids to read, de-duplicated."""
        if fields != self._fields:  # another model reads other fields: start over
            self._fields, self._rows = fields, {}
        now = self.clock()
        rows: list[Row] = []
        missing: dict[str, None] = {}
        for item_id in item_ids:
            hit = self._rows.get(item_id)
            if hit is not None and hit[0] > now:
                rows.append(hit[1])
            else:
                rows.append(None)
                missing[item_id] = None
        return rows, list(missing)

    def store(self, fields: tuple[str, ...], item_ids: Sequence[str], rows: Sequence[Row]) -> None:
        """Remember freshly read rows (unknown items too, as ``None``)."""
        if fields != self._fields:
            return
        if len(self._rows) + len(item_ids) > self.max_items:
            now = self.clock()
            self._rows = {k: v for k, v in self._rows.items() if v[0] > now}
            if len(self._rows) + len(item_ids) > self.max_items:
                self._rows = {}
        expires = self.clock() + self.ttl_s
        for item_id, row in zip(item_ids, rows, strict=True):
            self._rows[item_id] = (expires, row)

    def __len__(self) -> int:
        return len(self._rows)


class FeatureReader:
    """Reads a request's features by the configured path, or gives None (defaults) on failure."""

    def __init__(
        self,
        store: AsyncFeatureStore,
        health: RedisHealth,
        metrics: ServingMetrics,
        read_path: str = "raw",
        pipe: RawPipeline | None = None,
        cache: ItemCache | None = None,
    ) -> None:
        if read_path == "raw" and pipe is None:
            raise ValueError("read_path 'raw' needs a RawPipeline")
        self.store = store
        self.health = health
        self.metrics = metrics
        # "raw" (HMGETs over RawPipeline), "pipeline" (redis-py HGETALLs), "naive" (one per key)
        self.read_path = read_path
        self.pipe = pipe
        self.cache = cache

    async def _read(
        self, user_id: str, item_ids: Sequence[str], fields: Sequence[str]
    ) -> FieldColumns:
        if self.pipe is not None and self.read_path == "raw":
            flow = read_columns_flow(self.store.keys, user_id, item_ids, fields)
            return await self.pipe.run(flow)
        if self.read_path == "pipeline":
            found = await self.store.read_request(user_id, item_ids)
            return FieldColumns.from_rows(fields_of_rows(fields, found.user, found.items))
        # the benchmark's naive baseline: one awaited round trip per key
        client, keys = self.store.client, self.store.keys
        user = decode_row(await client.hgetall(keys.user_features(user_id)))
        items = [decode_row(await client.hgetall(keys.item_features(i))) for i in item_ids]
        return FieldColumns.from_rows(fields_of_rows(fields, user, items))

    async def _read_through_cache(
        self, user_id: str, item_ids: Sequence[str], fields: tuple[str, ...]
    ) -> FieldColumns:
        if self.cache is None:
            return await self._read(user_id, item_ids, fields)
        rows, missing = self.cache.lookup(fields, item_ids)
        found = await self._read(user_id, missing, fields)  # the user is always read
        self.cache.store(fields, missing, found.items)
        if missing:
            fresh = dict(zip(missing, found.items, strict=True))
            rows = [fresh.get(i, row) for i, row in zip(item_ids, rows, strict=True)]
        return FieldColumns.from_rows(FieldRows(found.fields, found.user, rows))

    async def read(
        self, user_id: str, item_ids: Sequence[str], fields: Sequence[str]
    ) -> FieldColumns | None:
        """Return the request's stored features, or None to score with defaults."""
        if not fields:
            return FieldColumns((), None, (), len(item_ids), len(item_ids))
        if not self.health.up:
            self.metrics.default_features.inc()
            return None
        try:
            found = await self._read_through_cache(user_id, item_ids, tuple(fields))
        except TRANSIENT as exc:
            self.health.mark_down(exc)
            self.metrics.default_features.inc()
            return None
        if found.user is None:
            self.metrics.unknown.labels("user").inc()
        if found.unknown:
            self.metrics.unknown.labels("item").inc(found.unknown)
        return found
