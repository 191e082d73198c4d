"""Live item counters against a real Redis, checked against a naive sliding-window count."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
import redis.asyncio

from feature_store.counters import (
    AsyncItemCounterWriter,
    CounterSettings,
    ItemCounterWriter,
    bucket_start,
    smoothed_ctr,
)
from feature_store.keys import COUNTERS_TS_FIELD, KeySpace
from feature_store.pipe import RawPipeline
from feature_store.store import FeatureStore, text

pytestmark = pytest.mark.integration

MINUTE = 60_000
SETTINGS = CounterSettings(window_ms=10 * MINUTE, bucket_ms=MINUTE)
Event = tuple[str, str, int]


def _batches(seed: int, n_batches: int = 40, n_items: int = 12) -> list[list[Event]]:
    """Event batches moving forward in event time with jitter, late events and late batches."""
    rng = random.Random(seed)
    batches: list[list[Event]] = []
    now = 100 * MINUTE
    for b in range(n_batches):
        now += rng.randrange(0, 3 * MINUTE)
        # every 7th batch is a replay from well before the current window
        base = now - 25 * MINUTE if b % 7 == 6 else now
        batch = []
        for _ in range(rng.randrange(1, 40)):
            late = rng.random() < 0.1
            ts = base - rng.randrange(0, (15 if late else 2) * MINUTE)
            kind = "click" if rng.random() < 0.2 else "impression"
            batch.append((f"i{rng.randrange(n_items)}", kind, ts))
        batches.append(batch)
    return batches


class NaiveCounters:
    """Reference: every event kept forever; totals recounted from scratch by a plain loop.

    An item's window ends at the newest bucket reached by any batch that mentioned the item.
    """

    def __init__(self, settings: CounterSettings) -> None:
        self.settings = settings
        self.events: list[Event] = []
        self.anchor: dict[str, int] = {}

    def add(self, batch: list[Event]) -> dict[str, tuple[int, int, int]]:
        batch_anchor = bucket_start(max(ts for _, _, ts in batch), self.settings.bucket_ms)
        touched = {item for item, _, _ in batch}
        self.events += batch
        for item in touched:
            self.anchor[item] = max(self.anchor.get(item, 0), batch_anchor)
        return {item: self.totals(item) for item in touched}

    def totals(self, item: str) -> tuple[int, int, int]:
        """(impressions, clicks, anchor) of ``item`` over its current window."""
        b, w, anchor = self.settings.bucket_ms, self.settings.window_ms, self.anchor[item]
        imps = clicks = 0
        for event_item, kind, ts in self.events:
            if event_item == item and anchor - w < bucket_start(ts, b) <= anchor:
                imps += kind == "impression"
                clicks += kind == "click"
        return imps, clicks, anchor


def _stored(client: redis.Redis, keys: KeySpace, item: str) -> tuple[int, int, int]:
    row = client.hgetall(keys.item_features(item))
    return int(row[b"item_imp_1h"]), int(row[b"item_clk_1h"]), int(row[COUNTERS_TS_FIELD.encode()])


@pytest.mark.parametrize("seed", [3, 8, 21])
def test_sliding_window_totals_match_a_naive_count(
    redis_client: redis.Redis, namespace: str, seed: int
) -> None:
    keys = KeySpace(namespace)
    writer = ItemCounterWriter(redis_client, SETTINGS, namespace)
    reference = NaiveCounters(SETTINGS)
    for batch in _batches(seed):
        expected = reference.add(batch)
        totals = writer.write(batch)
        assert {i: (t.impressions, t.clicks, t.anchor_ms) for i, t in totals.items()} == expected
        for item, (imps, clicks, anchor) in expected.items():
            assert _stored(redis_client, keys, item) == (imps, clicks, anchor)
            assert totals[item].ctr == smoothed_ctr(imps, clicks, SETTINGS)
            # stale buckets were trimmed: only the window's buckets remain
            for field in redis_client.hkeys(keys.item_counters(item)):
                assert int(text(field).split(":")[1]) > anchor - SETTINGS.window_ms
    # items not touched by the last batches still hold their last totals
    for item in reference.anchor:
        assert _stored(redis_client, keys, item) == reference.totals(item)


def test_ctr_feature_is_readable_through_the_store(
    redis_client: redis.Redis, namespace: str
) -> None:
    writer = ItemCounterWriter(redis_client, SETTINGS, namespace)
    events = [("hot", "impression", 5 * MINUTE + k) for k in range(30)]
    events += [("hot", "click", 5 * MINUTE + k) for k in range(6)]
    writer.write(events)
    row = FeatureStore(redis_client, namespace).read("item", ["hot"])[0]
    assert row is not None
    assert row.features == {
        "item_imp_1h": 30,
        "item_clk_1h": 6,
        "item_ctr_1h": pytest.approx((6 + 1) / (30 + 20)),
    }
    assert row.ts_ms is None  # the counters have their own guard, not the catalog's `_ts`


def test_catalog_rows_and_counters_do_not_block_each_other(
    redis_client: redis.Redis, namespace: str
) -> None:
    store = FeatureStore(redis_client, namespace)
    writer = ItemCounterWriter(redis_client, SETTINGS, namespace)
    assert store.write("item", [("i1", {"item_price": 3.0}, 10_000 * MINUTE)]) == 1
    writer.write([("i1", "impression", 100 * MINUTE)])  # far older than the catalog row
    writer.write([("i1", "impression", 200 * MINUTE)])
    # a catalog row older than the counters' anchor still applies
    assert store.write("item", [("i1", {"item_price": 4.0}, 10_001 * MINUTE)]) == 1
    row = store.read("item", ["i1"])[0]
    assert row is not None
    assert row.features["item_price"] == 4.0
    assert row.features["item_imp_1h"] == 1
    assert row.ts_ms == 10_001 * MINUTE


def test_at_most_two_round_trips_per_batch(
    counted: tuple[redis.Redis, list[object]], namespace: str
) -> None:
    client, sent = counted
    writer = ItemCounterWriter(client, SETTINGS, namespace)
    batches = _batches(seed=5, n_batches=6, n_items=200)
    writer.write(batches[0])  # loads the merge script if needed
    for batch in batches[1:]:
        sent.clear()
        writer.write(batch)
        assert len(sent) == 2
    sent.clear()
    assert writer.write([]) == {}
    assert sent == []


def test_bucket_hashes_expire_after_a_window(redis_client: redis.Redis, namespace: str) -> None:
    writer = ItemCounterWriter(redis_client, SETTINGS, namespace)
    writer.write([("i1", "click", 50 * MINUTE)])
    pttl = redis_client.pttl(KeySpace(namespace).item_counters("i1"))
    assert SETTINGS.window_ms < pttl <= SETTINGS.window_ms + SETTINGS.bucket_ms


def test_invalid_events_fail_the_batch_before_anything_is_written(
    redis_client: redis.Redis, namespace: str
) -> None:
    writer = ItemCounterWriter(redis_client, SETTINGS, namespace)
    with pytest.raises(ValueError):
        writer.write([("i1", "impression", 1), ("i1", "purchase", 2)])
    with pytest.raises(ValueError):
        writer.write([("i1", "impression", 1), ("bad id", "click", 2)])
    assert list(redis_client.scan_iter(match=f"{namespace}*")) == []


async def test_async_writer_gives_the_same_totals(
    redis_url: str, redis_client: redis.Redis, namespace: str
) -> None:
    sync_writer = ItemCounterWriter(redis_client, SETTINGS, namespace + "sync:")
    aclient = redis.asyncio.Redis.from_url(redis_url)
    try:
        async_writer = AsyncItemCounterWriter(aclient, SETTINGS, namespace + "async:")
        for batch in _batches(seed=11, n_batches=10):
            assert await async_writer.write(batch) == sync_writer.write(batch)
    finally:
        await aclient.aclose()


@pytest.fixture
async def pipe(redis_url: str) -> AsyncIterator[RawPipeline]:
    pipe = RawPipeline(redis_url, timeout_s=2.0)
    yield pipe
    await pipe.aclose()


def _dump(client: redis.Redis, prefix: str) -> dict[str, tuple[dict[Any, Any], bool]]:
    """Every hash under ``prefix``: key without the prefix -> (fields, has a TTL)."""
    return {
        text(key)[len(prefix) :]: (client.hgetall(key), client.pttl(key) > 0)
        for key in client.scan_iter(match=f"{prefix}*", count=1000)
    }


@pytest.mark.parametrize("seed", [4, 17])
async def test_raw_pipeline_stores_the_same_hashes_as_redis_py(
    pipe: RawPipeline, redis_url: str, redis_client: redis.Redis, namespace: str, seed: int
) -> None:
    aclient = redis.asyncio.Redis.from_url(redis_url)
    try:
        over_py = AsyncItemCounterWriter(aclient, SETTINGS, namespace + "py:")
        over_raw = AsyncItemCounterWriter(pipe, SETTINGS, namespace + "raw:")
        for batch in _batches(seed, n_batches=25, n_items=60):
            assert await over_raw.write(batch) == await over_py.write(batch)
    finally:
        await aclient.aclose()
    stored = _dump(redis_client, namespace + "raw:")
    assert stored == _dump(redis_client, namespace + "py:")
    # both bucket hashes (with their TTL) and feature hashes were compared
    assert {key.split(":")[0] for key in stored} == {"cnt", "feat"}
    assert all(ttl for key, (_, ttl) in stored.items() if key.startswith("cnt:"))


async def test_raw_pipeline_counters_survive_a_script_flush(
    pipe: RawPipeline, redis_client: redis.Redis, namespace: str
) -> None:
    keys = KeySpace(namespace)
    writer = AsyncItemCounterWriter(pipe, SETTINGS, namespace)
    reference = NaiveCounters(SETTINGS)
    for batch in _batches(seed=13, n_batches=4):
        redis_client.script_flush()  # as after a server restart: every EVALSHA answers NOSCRIPT
        expected = reference.add(batch)
        totals = await writer.write(batch)
        assert {i: (t.impressions, t.clicks, t.anchor_ms) for i, t in totals.items()} == expected
        for item, counts in expected.items():
            assert _stored(redis_client, keys, item) == counts
