"""The scorer's feature read: read_fields_flow over redis-py and over RawPipeline, real Redis."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from feature_store.keys import KeySpace
from feature_store.pipe import RawPipeline
from feature_store.store import (
    MERGE_NEWEST,
    AsyncFeatureStore,
    FeatureStore,
    FieldColumns,
    arun_flow,
    merge_command,
    read_columns_flow,
    read_fields_flow,
    run_flow,
)
from serving.features import FeatureReader, ItemCache, RedisHealth
from serving.metrics import ServingMetrics
from tests.conftest import free_port

pytestmark = pytest.mark.integration

FIELDS = ("user_segment", "item_category", "item_price", "item_ctr_1h")


@pytest.fixture
def store(redis_client: redis.Redis, namespace: str) -> FeatureStore:
    store = FeatureStore(redis_client, namespace)
    store.write("user", [("u1", {"user_segment": "s3", "user_activity": 0.5}, 10)])
    store.write(
        "item",
        [(f"i{k}", {"item_category": f"c{k % 3}", "item_price": k * 1.5}, 10) for k in range(30)],
    )
    return store


@pytest.fixture
async def pipe(redis_url: str) -> AsyncIterator[RawPipeline]:
    pipe = RawPipeline(redis_url, timeout_s=2.0)
    yield pipe
    await pipe.aclose()


def _expected(store: FeatureStore, user: str, items: list[str]) -> tuple[Any, list[Any]]:
    """The same projection computed from whole hashes (HGETALL), the reference read."""
    found = store.read_request(user, items)

    def project(row: Any) -> list[Any] | None:
        if row is None:
            return None
        values = [row.features.get(f) for f in FIELDS]
        return values if any(v is not None for v in values) else None

    return project(found.user), [project(r) for r in found.items]


async def test_raw_pipeline_reads_the_same_rows_as_hgetall(
    store: FeatureStore, pipe: RawPipeline, namespace: str
) -> None:
    items = ["i3", "missing", "i29", "i0", "i3"]
    got = await pipe.run(read_fields_flow(KeySpace(namespace), "u1", items, FIELDS))
    assert got.fields == FIELDS
    assert (got.user, got.items) == _expected(store, "u1", items)
    assert got.items[0] == [None, "c0", 4.5, None]
    assert got.items[1] is None


async def test_redis_py_runner_and_sync_store_agree_with_raw(
    store: FeatureStore, pipe: RawPipeline, redis_url: str, namespace: str
) -> None:
    items = [f"i{k}" for k in range(0, 30, 4)] + ["nope"]
    raw = await pipe.run(read_fields_flow(KeySpace(namespace), "nobody", items, FIELDS))
    assert store.read_fields("nobody", items, FIELDS) == raw
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        assert (
            await AsyncFeatureStore(client, namespace).read_fields("nobody", items, FIELDS) == raw
        )
    finally:
        await client.aclose()
    assert raw.user is None


async def test_values_typed_by_hand_decode_value_by_value(
    store: FeatureStore, pipe: RawPipeline, redis_client: redis.Redis, namespace: str
) -> None:
    key = KeySpace(namespace).item_features("i1")
    redis_client.hset(key, mapping={"item_category": "typed by hand", "item_ctr_1h": "[1, 2]"})
    got = await pipe.run(read_fields_flow(KeySpace(namespace), "u1", ["i1", "i2"], FIELDS))
    assert got.items[0] == [None, "typed by hand", 1.5, "[1, 2]"]
    assert got.items[1] == [None, "c2", 3.0, None]


@pytest.fixture
def socket_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the writes to asyncio sockets from now on (one per round trip)."""
    writes: list[int] = []
    original = asyncio.StreamWriter.write

    def counting(self: asyncio.StreamWriter, data: bytes | bytearray | memoryview) -> None:
        writes.append(len(data))
        original(self, data)

    monkeypatch.setattr(asyncio.StreamWriter, "write", counting)
    return writes


async def test_one_step_is_one_write_and_connections_are_reused(
    store: FeatureStore, pipe: RawPipeline, namespace: str, socket_writes: list[int]
) -> None:
    writes = socket_writes
    keys = KeySpace(namespace)
    for _ in range(3):
        await pipe.run(read_fields_flow(keys, "u1", [f"i{k}" for k in range(30)], FIELDS))
    assert len(writes) == 3  # one round trip per request, no handshake on a reused connection


async def test_error_replies_raise_and_keep_the_connection_usable(pipe: RawPipeline) -> None:
    with pytest.raises(ResponseError):
        await pipe.execute([("PING",), ("NOT-A-COMMAND", "x")])
    assert await pipe.execute([("PING",)]) == [b"PONG"]


async def test_noscript_replies_are_repaired_in_one_more_round_trip(
    pipe: RawPipeline, redis_client: redis.Redis, namespace: str, request: pytest.FixtureRequest
) -> None:
    keys = KeySpace(namespace)
    a, b, plain = keys.item_features("a"), keys.item_features("b"), f"{namespace}plain"
    step = [
        merge_command(a, {"x": "1"}, 5),
        ("SET", plain, "v"),
        merge_command(b, {"x": "2"}, 5),
        ("GET", plain),
        merge_command(a, {"x": "0"}, 4),  # older than the first: ignored
    ]
    await pipe.execute([("PING",)])  # open the connection before counting round trips
    writes: list[int] = request.getfixturevalue("socket_writes")
    redis_client.script_flush()  # as after a server restart: EVALSHA answers NOSCRIPT
    assert await pipe.execute(step) == [1, b"OK", 1, b"v", 0]
    assert len(writes) == 2  # the step, then SCRIPT LOAD + the three EVALSHAs again
    assert redis_client.script_exists(MERGE_NEWEST.sha) == [True]
    assert redis_client.hgetall(a) == {b"_ts": b"5", b"x": b"1"}
    assert redis_client.hgetall(b) == {b"_ts": b"5", b"x": b"2"}
    assert await pipe.execute(step[:1]) == [1]
    assert len(writes) == 3  # loaded: one round trip again


async def test_other_error_replies_still_raise_after_a_noscript_repair(
    pipe: RawPipeline, redis_client: redis.Redis, namespace: str
) -> None:
    key, plain = KeySpace(namespace).item_features("a"), f"{namespace}plain"
    redis_client.set(plain, "not a hash")
    redis_client.script_flush()
    with pytest.raises(ResponseError) as unknown:
        await pipe.execute([merge_command(key, {"x": "3"}, 9), ("NOT-A-COMMAND", "x")])
    assert not isinstance(unknown.value, NoScriptError)
    assert redis_client.hget(key, "x") == b"3"  # repaired and applied, as execute_step does
    redis_client.script_flush()
    with pytest.raises(ResponseError, match="WRONGTYPE") as wrong:
        await pipe.execute([merge_command(plain, {"x": "1"}, 1)])  # fails inside the script
    assert not isinstance(wrong.value, NoScriptError)
    assert await pipe.execute([("PING",)]) == [b"PONG"]


async def test_concurrent_requests_each_get_their_own_answers(
    store: FeatureStore, pipe: RawPipeline, namespace: str
) -> None:
    keys = KeySpace(namespace)

    async def one(k: int) -> list[Any]:
        found = await pipe.run(read_fields_flow(keys, "u1", [f"i{k}"], FIELDS))
        return [found.items[0]]

    answers = await asyncio.gather(*(one(k) for k in range(20)))
    assert [a[0][2] for a in answers] == [k * 1.5 for k in range(20)]


async def test_a_refused_connection_is_a_redis_connection_error() -> None:
    pipe = RawPipeline(f"redis://127.0.0.1:{free_port()}/0", timeout_s=1.0)
    with pytest.raises(RedisConnectionError):
        await pipe.execute([("PING",)])


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server that accepts and never answers (a hung Redis)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    yield int(server.getsockname()[1])
    server.close()


async def test_a_hung_server_is_a_redis_timeout_error(silent_server: int) -> None:
    pipe = RawPipeline(f"redis://127.0.0.1:{silent_server}/0", timeout_s=0.2)
    with pytest.raises(RedisTimeoutError):
        await pipe.execute([("PING",)])
    assert pipe._idle == []  # a connection with an unread reply is never reused


async def test_select_from_the_url_is_honoured(redis_url: str, redis_client: redis.Redis) -> None:
    other_db = redis_url.rsplit("/", 1)[0] + "/3"
    writer = redis.Redis.from_url(other_db)
    writer.set("mtl-pipe-test", b"db3")
    pipe = RawPipeline(other_db, timeout_s=2.0)
    try:
        assert await pipe.execute([("GET", "mtl-pipe-test")]) == [b"db3"]
        assert redis_client.get("mtl-pipe-test") is None
    finally:
        await pipe.aclose()
        writer.delete("mtl-pipe-test")
        writer.close()


async def test_columns_read_the_same_as_rows_over_every_runner(
    store: FeatureStore,
    pipe: RawPipeline,
    redis_client: redis.Redis,
    redis_url: str,
    namespace: str,
) -> None:
    keys = KeySpace(namespace)
    redis_client.hset(
        keys.item_features("i1"),
        mapping={"item_category": "typed by hand", "item_ctr_1h": "[1, 2]", "item_price": '"a'},
    )
    redis_client.hset(keys.item_features("i2"), mapping={"item_category": 'b"'})
    items = ["i1", "i2", "missing", "i7", "i1"]
    rows = await pipe.run(read_fields_flow(keys, "u1", items, FIELDS))
    columns = await pipe.run(read_columns_flow(keys, "u1", items, FIELDS))
    assert columns.rows() == rows
    assert rows.items[0] == [None, "typed by hand", '"a', "[1, 2]"]
    assert rows.items[1] == [None, 'b"', 3.0, None]
    assert (columns.size, columns.unknown) == (5, 1)
    assert run_flow(redis_client, read_columns_flow(keys, "u1", items, FIELDS)) == columns
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        assert await arun_flow(client, read_columns_flow(keys, "u1", items, FIELDS)) == columns
    finally:
        await client.aclose()


async def test_the_reader_gives_the_same_columns_by_every_read_path(
    store: FeatureStore, pipe: RawPipeline, redis_url: str, namespace: str
) -> None:
    items = [f"i{k}" for k in range(0, 30, 3)] + ["nope", "i3"]
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        answers = []
        for path, cache in [("raw", None), ("pipeline", None), ("naive", None), ("raw", 60.0)]:
            metrics = ServingMetrics()
            health = RedisHealth(client, metrics)
            assert await health.probe()
            features = AsyncFeatureStore(client, namespace)
            item_cache = None if cache is None else ItemCache(cache)
            reader = FeatureReader(features, health, metrics, path, pipe, item_cache)
            found = await reader.read("u1", items, FIELDS)
            assert isinstance(found, FieldColumns)
            answers.append(found)
            if item_cache is not None:  # again, now from the cache
                assert await reader.read("u1", items, FIELDS) == found
            unknown = metrics.registry.get_sample_value(
                "mtl_serve_unknown_entities_total", {"entity": "item"}
            )
            assert unknown == (1 if cache is None else 2)  # the cached read counts it again
        assert all(answer == answers[0] for answer in answers)
        refused = RawPipeline(f"redis://127.0.0.1:{free_port()}/0", timeout_s=1.0)
        metrics = ServingMetrics()
        health = RedisHealth(client, metrics)
        assert await health.probe()
        reader = FeatureReader(
            AsyncFeatureStore(client, namespace), health, metrics, "raw", refused
        )
        assert await reader.read("u1", items, FIELDS) is None  # Redis away: defaults
        assert not health.up
    finally:
        await client.aclose()
