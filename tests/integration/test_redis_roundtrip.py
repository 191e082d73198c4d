"""Redis round trip with pipelining against the real server."""

from __future__ import annotations

import pytest
import redis

pytestmark = pytest.mark.integration


def test_pipelined_hash_round_trip(redis_client: redis.Redis, namespace: str) -> None:
    keys = [f"{namespace}feat:item:{i}" for i in range(200)]
    pipe = redis_client.pipeline(transaction=False)
    for i, key in enumerate(keys):
        pipe.hset(key, mapping={"price": str(i * 0.5), "_ts": str(1000 + i)})
    assert pipe.execute() == [2] * len(keys)

    pipe = redis_client.pipeline(transaction=False)
    for key in [*keys, f"{namespace}feat:item:missing"]:
        pipe.hgetall(key)
    rows = pipe.execute()
    assert rows[-1] == {}
    assert [float(r[b"price"]) for r in rows[:-1]] == [i * 0.5 for i in range(200)]
    assert rows[7][b"_ts"] == b"1007"


def test_transaction_is_atomic(redis_client: redis.Redis, namespace: str) -> None:
    pipe = redis_client.pipeline(transaction=True)
    pipe.set(f"{namespace}blob", b"\x00\x01binary")
    pipe.set(f"{namespace}latest", 1)
    pipe.execute()
    assert redis_client.mget([f"{namespace}blob", f"{namespace}latest"]) == [
        b"\x00\x01binary",
        b"1",
    ]
