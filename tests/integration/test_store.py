"""Feature hashes against a real Redis: batch reads, newest-event-time writes, TTL, round trips."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
import redis.asyncio

from feature_store.errors import InvalidFeatureError, InvalidKeyPartError
from feature_store.keys import KeySpace
from feature_store.store import AsyncFeatureStore, FeatureRow, FeatureStore, FeatureWrite

pytestmark = pytest.mark.integration


@pytest.fixture
async def aclient(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """An asyncio client of the session's Redis (bytes), closed after the test."""
    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def _items(n: int, ts_ms: int = 1_000) -> list[FeatureWrite]:
    return [
        FeatureWrite(f"i{k}", {"item_price": k * 0.5, "item_category": f"c{k % 7}"}, ts_ms)
        for k in range(n)
    ]


def test_read_returns_rows_in_input_order_with_none_for_missing(
    redis_client: redis.Redis, namespace: str
) -> None:
    store = FeatureStore(redis_client, namespace)
    assert store.write("item", _items(20)) == 20
    ids = ["i13", "nope", "i2", "i19", "also-missing", "i0"]
    rows = store.read("item", ids)
    assert [None if r is None else r.features["item_price"] for r in rows] == [
        6.5,
        None,
        1.0,
        9.5,
        None,
        0.0,
    ]
    assert rows[0] == FeatureRow({"item_price": 6.5, "item_category": "c6"}, 1_000)
    assert store.read("item", []) == []


def test_read_request_fetches_user_and_candidates_in_one_round_trip(
    counted: tuple[redis.Redis, list[object]], namespace: str
) -> None:
    client, sent = counted
    store = FeatureStore(client, namespace)
    store.write("item", _items(500))
    store.write("user", [("u1", {"user_segment": "s3", "user_activity": 0.7}, 5)])
    candidates = [f"i{k}" for k in range(499, -1, -1)] + ["ghost"]
    sent.clear()
    request = store.read_request("u1", candidates)
    assert len(sent) == 1
    assert request.user == FeatureRow({"user_segment": "s3", "user_activity": 0.7}, 5)
    assert len(request.items) == 501
    assert request.items[-1] is None
    assert [r.features["item_price"] for r in request.items[:-1] if r] == [
        k * 0.5 for k in range(499, -1, -1)
    ]
    missing_user = store.read_request("nobody", ["i1"])
    assert missing_user.user is None
    assert missing_user.items[0] is not None


def test_batch_write_is_one_round_trip_once_the_script_is_loaded(
    counted: tuple[redis.Redis, list[object]], namespace: str
) -> None:
    client, sent = counted
    store = FeatureStore(client, namespace)
    store.write("item", _items(1))  # loads the script if this server has not seen it
    sent.clear()
    assert store.write("item", _items(300, ts_ms=2_000)) == 300
    assert len(sent) == 1


def test_newest_event_time_wins(redis_client: redis.Redis, namespace: str) -> None:
    store = FeatureStore(redis_client, namespace)
    assert store.write("user", [("u1", {"user_activity": 1.0, "user_segment": "s1"}, 100)]) == 1
    # an older row changes nothing, not even the fields it alone carries
    assert store.write("user", [("u1", {"user_activity": 0.0, "extra": 3}, 50)]) == 0
    assert store.read("user", ["u1"]) == [
        FeatureRow({"user_activity": 1.0, "user_segment": "s1"}, 100)
    ]
    # a newer row applies its fields and keeps the others
    assert store.write("user", [("u1", {"user_activity": 2.0}, 200)]) == 1
    assert store.read("user", ["u1"]) == [
        FeatureRow({"user_activity": 2.0, "user_segment": "s1"}, 200)
    ]
    # the same event time again applies (replays are idempotent)
    assert store.write("user", [("u1", {"user_activity": 2.0}, 200)]) == 1
    # within one batch, rows are applied in order: the older second row is ignored
    rows = [("u2", {"v": 1}, 10), ("u2", {"v": 2}, 5), ("u3", {"v": 3}, 1)]
    assert store.write("user", rows) == 2
    assert [r.features if r else None for r in store.read("user", ["u2", "u3"])] == [
        {"v": 1},
        {"v": 3},
    ]


def test_ttl_is_set_only_when_asked(redis_client: redis.Redis, namespace: str) -> None:
    store = FeatureStore(redis_client, namespace)
    store.write("item", [("short", {"x": 1}, 1)], ttl_s=60)
    store.write("item", [("forever", {"x": 1}, 1)])
    keys = KeySpace(namespace)
    assert 0 < redis_client.ttl(keys.item_features("short")) <= 60
    assert redis_client.ttl(keys.item_features("forever")) == -1
    # an ignored (older) row does not refresh the TTL
    redis_client.expire(keys.item_features("short"), 5)
    store.write("item", [("short", {"x": 2}, 0)], ttl_s=60)
    assert redis_client.ttl(keys.item_features("short")) <= 5


def test_bad_rows_fail_the_batch_before_anything_is_written(
    redis_client: redis.Redis, namespace: str
) -> None:
    store = FeatureStore(redis_client, namespace)
    with pytest.raises(InvalidFeatureError):
        store.write("item", [("ok", {"x": 1}, 1), ("bad", {"x": float("nan")}, 1)])
    with pytest.raises(InvalidKeyPartError):
        store.write("item", [("ok", {"x": 1}, 1), ("bad:id", {"x": 1}, 1)])
    with pytest.raises(InvalidKeyPartError):
        store.read("item", ["fine", "not fine"])
    assert store.read("item", ["ok"]) == [None]


def test_writes_survive_a_script_flush(redis_client: redis.Redis, namespace: str) -> None:
    store = FeatureStore(redis_client, namespace)
    store.write("item", [("a", {"x": 1}, 1)])
    redis_client.script_flush()  # as after a server restart: EVALSHA answers NOSCRIPT
    assert store.write("item", [("a", {"x": 2}, 2), ("b", {"x": 3}, 2)]) == 2
    assert [r.features["x"] if r else None for r in store.read("item", ["a", "b"])] == [2, 3]


def test_values_written_by_hand_are_tolerated(redis_client: redis.Redis, namespace: str) -> None:
    key = KeySpace(namespace).item_features("manual")
    redis_client.hset(key, mapping={"item_category": "c7", "item_price": "12.5", "_ts": "9"})
    row = FeatureStore(redis_client, namespace).read("item", ["manual"])[0]
    assert row == FeatureRow({"item_category": "c7", "item_price": 12.5}, 9)


def test_decoding_clients_read_the_same_rows(redis_url: str, namespace: str) -> None:
    with redis.Redis.from_url(redis_url, decode_responses=True) as text_client:
        store = FeatureStore(text_client, namespace)
        store.write("item", _items(3))
        assert store.read("item", ["i2"]) == [
            FeatureRow({"item_price": 1.0, "item_category": "c2"}, 1_000)
        ]


async def test_async_store_shares_the_sync_behaviour(
    aclient: redis.asyncio.Redis, redis_client: redis.Redis, namespace: str
) -> None:
    astore = AsyncFeatureStore(aclient, namespace)
    assert await astore.write("item", _items(5), ttl_s=30) == 5
    assert await astore.write("item", [("i1", {"item_price": -1.0}, 2_000)]) == 1
    assert await astore.write("item", [("i1", {"item_price": -2.0}, 1_999)]) == 0
    request = await astore.read_request("u-missing", ["i1", "x", "i4"])
    assert request.user is None
    assert [r.features["item_price"] if r else None for r in request.items] == [-1.0, None, 2.0]
    assert await astore.read("item", ["i3"]) == FeatureStore(redis_client, namespace).read(
        "item", ["i3"]
    )
    assert 0 < redis_client.ttl(KeySpace(namespace).item_features("i0")) <= 30


async def test_async_read_request_is_one_round_trip(redis_url: str, namespace: str) -> None:
    sent: list[object] = []

    class CountingConnection(redis.asyncio.Connection):
        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            sent.append(command)
            await super().send_packed_command(command, check_health)

    pool = redis.asyncio.ConnectionPool.from_url(redis_url, connection_class=CountingConnection)
    client = redis.asyncio.Redis(connection_pool=pool)
    try:
        store = AsyncFeatureStore(client, namespace)
        await store.write("item", _items(500))
        sent.clear()
        request = await store.read_request("u1", [f"i{k}" for k in range(500)])
        assert len(sent) == 1
        assert sum(r is not None for r in request.items) == 500
    finally:
        await client.aclose()
        await pool.disconnect()
