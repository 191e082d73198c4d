"""Live item counters: impressions and clicks over a sliding event-time window, for fresh CTR.

Each item has a bucket hash (``mtl:cnt:item:{id}``) with one field per kind and bucket,
``imp:{start_ms}`` / ``clk:{start_ms}`` -> count. A batch of events costs two round trips:

1. HINCRBY every touched bucket, then HGETALL each touched item's bucket hash (same pipeline,
   so the reply already includes this batch) and HGET the anchor its totals were last written at;
2. per item: HDEL the buckets that fell out of the window, write the window totals into the
   item's feature hash (``item_imp_1h``, ``item_clk_1h``, ``item_ctr_1h``), and refresh the
   bucket hash's TTL.

The window ends at the *anchor*: the latest of the batch's newest bucket (event time), the
item's newest bucket and the anchor stored with the item's totals, so a late batch never moves
it back (buckets trimmed once stay trimmed). Every item a batch mentions is recomputed, even
when all its events were too late to count. It holds the ``window_ms / bucket_ms`` buckets up to
and including the anchor's. Totals are written with ``_ts:counters`` = the anchor, through the
newest-event-time merge, so of two workers racing on one item a write computed on an older
anchor is ignored. The totals are pushed, not pulled: an item without new events keeps its last
totals until its next event.

Examples
--------
>>> settings = CounterSettings(window_ms=180_000, bucket_ms=60_000)
>>> increments, anchor = count_batch(
...     [("i1", "impression", 61_000), ("i1", "click", 62_000), ("i1", "impression", 190_000)],
...     settings,
... )
>>> increments, anchor
({'i1': {'imp:60000': 1, 'clk:60000': 1, 'imp:180000': 1}}, 180000)
>>> totals, stale = window_totals({"imp:0": 4, "imp:60000": 1, "clk:60000": 1}, 180_000, settings)
>>> totals.impressions, totals.clicks, stale
(1, 1, ['imp:0'])
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import redis
import redis.asyncio

from feature_store.keys import COUNTERS_TS_FIELD, DEFAULT_NAMESPACE, KeySpace
from feature_store.pipe import RawPipeline
from feature_store.store import (
    Command,
    Flow,
    RawHash,
    arun_flow,
    as_keyspace,
    check_feature_name,
    check_ts,
    check_ttl,
    encode_value,
    merge_command,
    run_flow,
    text,
)

__all__ = [
    "AsyncItemCounterWriter",
    "CounterEvent",
    "CounterSettings",
    "ItemCounterWriter",
    "Kind",
    "WindowTotals",
    "bucket_field",
    "bucket_start",
    "count_batch",
    "counter_client",
    "counter_flow",
    "decode_buckets",
    "smoothed_ctr",
    "window_totals",
]

logger = logging.getLogger(__name__)

Kind = Literal["impression", "click"]
_PREFIX: dict[str, str] = {"impression": "imp", "click": "clk"}


@dataclass(frozen=True)
class CounterSettings:
    """How item counters are bucketed, windowed, smoothed and named."""

    # sliding window length (event time); a multiple of bucket_ms
    window_ms: int = 3_600_000
    # bucket width: the window slides by this step
    bucket_ms: int = 60_000
    # Beta prior of the smoothed ctr: (clicks + prior_clicks) / (imps + prior_impressions)
    prior_clicks: float = 1.0
    # weight of the prior in impressions; 1 / 20 = a 5% ctr for items never shown
    prior_impressions: float = 20.0
    # feature names written into the item hash (the learner's dense features)
    impressions_field: str = "item_imp_1h"
    clicks_field: str = "item_clk_1h"
    ctr_field: str = "item_ctr_1h"
    # TTL (seconds) set on the item feature hash with each counter write; None keeps it
    ttl_s: int | None = None

    def __post_init__(self) -> None:
        """Check the window, the prior and the field names up front."""
        if self.bucket_ms < 1 or self.window_ms < self.bucket_ms:
            raise ValueError(
                f"need 1 <= bucket_ms <= window_ms, got {self.bucket_ms}, {self.window_ms}"
            )
        if self.window_ms % self.bucket_ms:
            raise ValueError(
                f"window_ms {self.window_ms} is not a multiple of bucket_ms {self.bucket_ms}"
            )
        if self.prior_clicks < 0 or self.prior_impressions <= 0:
            raise ValueError("need prior_clicks >= 0 and prior_impressions > 0")
        for name in (self.impressions_field, self.clicks_field, self.ctr_field):
            check_feature_name(name)
        check_ttl(self.ttl_s)


class CounterEvent(NamedTuple):
    """One counted event: which item, impression or click, event time (epoch ms)."""

    item_id: str
    kind: Kind
    ts_ms: int


@dataclass(frozen=True)
class WindowTotals:
    """An item's counts over the window ending at ``anchor_ms``, and its smoothed ctr."""

    impressions: int
    clicks: int
    ctr: float
    # start (epoch ms) of the newest bucket in the window
    anchor_ms: int


# --- pure bucket math ---------------------------------------------------------------------------


def bucket_start(ts_ms: int, bucket_ms: int) -> int:
    """Start of the bucket holding ``ts_ms``.

    Examples
    --------
    >>> bucket_start(119_999, 60_000), bucket_start(120_000, 60_000)
    (60000, 120000)
    """
    return ts_ms - ts_ms % bucket_ms


def _prefix(kind: str) -> str:
    """Field prefix of an event kind; rejects unknown kinds."""
    prefix = _PREFIX.get(kind)
    if prefix is None:
        raise ValueError(f"event kind must be one of {sorted(_PREFIX)}, got {kind!r}")
    return prefix


def bucket_field(kind: str, start_ms: int) -> str:
    """Field of a bucket in the bucket hash: ``imp:{start_ms}`` or ``clk:{start_ms}``."""
    return f"{_prefix(kind)}:{start_ms}"


def _parse_field(name: str) -> tuple[str, int] | None:
    """``(prefix, start_ms)`` of a bucket field, ``None`` for anything else."""
    prefix, _, start = name.partition(":")
    if prefix not in ("imp", "clk") or not start.isdigit():
        return None
    return prefix, int(start)


def smoothed_ctr(impressions: int, clicks: int, settings: CounterSettings) -> float:
    """Beta-smoothed click-through rate, capped at 1 (clicks can outlive their impressions)."""
    ctr = (clicks + settings.prior_clicks) / (impressions + settings.prior_impressions)
    return min(1.0, ctr)


def count_batch(
    events: Iterable[CounterEvent | tuple[str, str, int]], settings: CounterSettings
) -> tuple[dict[str, dict[str, int]], int]:
    """Aggregate a batch into per-item bucket increments; return them and the batch's anchor.

    Events already out of the window ending at the batch's newest bucket are not counted, but
    their items still get an (empty) entry: every item a batch mentions has its window slid to
    the batch's anchor, so its old counts expire as event time moves on.
    """
    rows = [(item_id, _prefix(kind), check_ts(ts_ms)) for item_id, kind, ts_ms in events]
    if not rows:
        return {}, 0
    anchor = bucket_start(max(ts for _, _, ts in rows), settings.bucket_ms)
    increments: dict[str, dict[str, int]] = {}
    for item_id, prefix, ts_ms in rows:
        per_item = increments.setdefault(item_id, {})
        start = bucket_start(ts_ms, settings.bucket_ms)
        if start > anchor - settings.window_ms:
            name = f"{prefix}:{start}"
            per_item[name] = per_item.get(name, 0) + 1
    return increments, anchor


def window_totals(
    buckets: Mapping[str, int], anchor_ms: int, settings: CounterSettings
) -> tuple[WindowTotals, list[str]]:
    """Sum an item's buckets over the window; also list the fields to delete (stale or unknown).

    The window ends at the later of ``anchor_ms`` and the item's newest bucket.
    """
    parsed = {name: _parse_field(name) for name in buckets}
    starts = [p[1] for p in parsed.values() if p is not None]
    anchor = max([anchor_ms, *starts])
    lowest = anchor - settings.window_ms  # exclusive
    sums = {"imp": 0, "clk": 0}
    stale: list[str] = []
    for name, bucket in parsed.items():
        if bucket is None or bucket[1] <= lowest:
            stale.append(name)
        else:
            sums[bucket[0]] += buckets[name]
    ctr = smoothed_ctr(sums["imp"], sums["clk"], settings)
    return WindowTotals(sums["imp"], sums["clk"], ctr, anchor), stale


def decode_buckets(raw: RawHash | Sequence[bytes | str]) -> dict[str, int]:
    """Decode a bucket hash to field -> count.

    The HGETALL reply is a mapping from redis-py, a flat ``[k1, v1, k2, v2, ...]`` list from
    :class:`~feature_store.pipe.RawPipeline` (RESP2 as hiredis parses it).

    Examples
    --------
    >>> decode_buckets({b"imp:0": b"3"}), decode_buckets([b"imp:0", b"3", b"clk:0", b"1"])
    ({'imp:0': 3}, {'imp:0': 3, 'clk:0': 1})
    """
    if isinstance(raw, Mapping):
        return {text(k): int(v) for k, v in raw.items()}
    if len(raw) % 2:
        raise ValueError(f"an HGETALL reply must have an even length, got {len(raw)} items")
    return {text(k): int(v) for k, v in zip(raw[::2], raw[1::2], strict=True)}


def _parse_anchor(raw: bytes | str | None) -> int:
    """The anchor stored with an item's totals (HGET reply); 0 when absent or unreadable."""
    try:
        return int(raw) if raw is not None else 0
    except ValueError:
        return 0


# --- flow ---------------------------------------------------------------------------------------


def _write_commands(
    keys: KeySpace, settings: CounterSettings, item_id: str, totals: WindowTotals, stale: list[str]
) -> list[Command]:
    """Round two for one item: trim stale buckets, write the totals, refresh the bucket TTL."""
    bucket_key = keys.item_counters(item_id)
    fields = {
        settings.impressions_field: str(totals.impressions),
        settings.clicks_field: str(totals.clicks),
        settings.ctr_field: encode_value(totals.ctr),
    }
    feature_key = keys.item_features(item_id)
    commands: list[Command] = [("HDEL", bucket_key, *stale)] if stale else []
    commands.append(
        merge_command(feature_key, fields, totals.anchor_ms, settings.ttl_s, COUNTERS_TS_FIELD)
    )
    # a bucket hash untouched for a whole window holds nothing current: let Redis drop it
    commands.append(("PEXPIRE", bucket_key, settings.window_ms + settings.bucket_ms))
    return commands


def counter_flow(
    keys: KeySpace,
    settings: CounterSettings,
    events: Iterable[CounterEvent | tuple[str, str, int]],
) -> Flow[dict[str, WindowTotals]]:
    """Count a batch of events in two round trips; return the new totals of the touched items."""
    increments, anchor = count_batch(events, settings)
    items = list(increments)
    if not items:
        return {}
    step: list[Command] = [
        ("HINCRBY", keys.item_counters(item), name, n)
        for item in items
        for name, n in increments[item].items()
    ]
    step += [("HGETALL", keys.item_counters(item)) for item in items]
    step += [("HGET", keys.item_features(item), COUNTERS_TS_FIELD) for item in items]
    replies = yield step
    n = len(items)
    buckets, stored = replies[-2 * n : -n], replies[-n:]
    totals: dict[str, WindowTotals] = {}
    writes: list[Command] = []
    for item, raw, last in zip(items, buckets, stored, strict=True):
        item_anchor = max(anchor, _parse_anchor(last))
        totals[item], stale = window_totals(decode_buckets(raw), item_anchor, settings)
        writes += _write_commands(keys, settings, item, totals[item], stale)
    yield writes
    return totals


# --- clients ------------------------------------------------------------------------------------


class ItemCounterWriter:
    """Updates item counters over a sync ``redis.Redis``."""

    def __init__(
        self,
        client: redis.Redis,
        settings: CounterSettings | None = None,
        namespace: str | KeySpace = DEFAULT_NAMESPACE,
    ) -> None:
        self.client = client
        self.settings = settings or CounterSettings()
        self.keys = as_keyspace(namespace)

    def write(
        self, events: Iterable[CounterEvent | tuple[str, str, int]]
    ) -> dict[str, WindowTotals]:
        """Count a batch of (item_id, kind, ts_ms) events; return the touched items' totals."""
        return run_flow(self.client, counter_flow(self.keys, self.settings, events))


class AsyncItemCounterWriter:
    """Updates item counters over a ``redis.asyncio.Redis`` or a :class:`RawPipeline`.

    The stream workers use a RawPipeline: a batch of thousands of commands costs several times
    less CPU than through redis-py's pipeline, and the stored counters are the same.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis | RawPipeline,
        settings: CounterSettings | None = None,
        namespace: str | KeySpace = DEFAULT_NAMESPACE,
    ) -> None:
        self.client = client
        self.settings = settings or CounterSettings()
        self.keys = as_keyspace(namespace)

    async def write(
        self, events: Iterable[CounterEvent | tuple[str, str, int]]
    ) -> dict[str, WindowTotals]:
        """Count a batch of (item_id, kind, ts_ms) events; return the touched items' totals."""
        flow = counter_flow(self.keys, self.settings, events)
        if isinstance(self.client, RawPipeline):
            return await self.client.run(flow)
        return await arun_flow(self.client, flow)


def counter_client(url: str, timeout_s: float = 2.0) -> RawPipeline | redis.asyncio.Redis:
    """The client a stream worker writes counters with; both kinds close with ``aclose()``.

    A :class:`RawPipeline`, or redis-py's client where the URL needs what RawPipeline lacks
    (TLS). ``timeout_s`` bounds one round trip: a whole step of a batch of thousands of events.

    Examples
    --------
    >>> type(counter_client("redis://localhost:6379/0")).__name__
    'RawPipeline'
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    try:
        return RawPipeline(url, timeout_s=timeout_s)
    except ValueError as exc:  # the URL: only a bad scheme is left to fail
        logger.warning("counters fall back to redis-py's pipeline: %s", exc)
        return redis.asyncio.Redis.from_url(url, socket_timeout=timeout_s)
