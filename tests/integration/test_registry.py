"""Model snapshots against a real Redis: publish, announce, verify, prune, roll back, race."""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import socket
import threading
from collections.abc import AsyncIterator, Iterator

import numpy as np
import pytest
import redis
import redis.asyncio
import safetensors.numpy
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from feature_store.errors import CorruptSnapshot, SnapshotNotFoundError
from feature_store.keys import KeySpace
from feature_store.registry import AsyncSnapshotRegistry, SnapshotRegistry, sha256_hex

pytestmark = pytest.mark.integration


def _weights(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return safetensors.numpy.save(
        {"expert.w": rng.standard_normal((8, 4)).astype(np.float32), "bias": np.zeros(4)}
    )


def _meta(step: int) -> dict[str, object]:
    return {
        "model_args": {"n_levels": 2, "d": 8},
        "feature_spec": {"dense": ["item_price"]},
        "step": step,
        "metrics": {"ctr_auc": 0.71},
        "offsets": {"samples": {"0": step * 10}},
    }


@pytest.fixture
def registry(redis_client: redis.Redis, namespace: str) -> SnapshotRegistry:
    return SnapshotRegistry(redis_client, "ple", namespace, keep=3, clock=lambda: 1_700_000_000.5)


@pytest.fixture
async def aregistry(redis_url: str, namespace: str) -> AsyncIterator[AsyncSnapshotRegistry]:
    client = redis.asyncio.Redis.from_url(redis_url)
    yield AsyncSnapshotRegistry(client, "ple", namespace)
    await client.aclose()


@pytest.fixture
def announcements(redis_client: redis.Redis, namespace: str) -> Iterator[redis.client.PubSub]:
    pubsub = redis.client.PubSub(redis_client.connection_pool, ignore_subscribe_messages=True)
    pubsub.subscribe(KeySpace(namespace).model_updates("ple"))
    pubsub.get_message(timeout=1.0)  # the subscribe confirmation
    yield pubsub
    pubsub.close()


def _next_announcement(pubsub: redis.client.PubSub) -> bytes | None:
    message = pubsub.get_message(timeout=2.0)
    return None if message is None else bytes(message["data"])


def test_publish_increments_versions_flips_latest_and_announces(
    registry: SnapshotRegistry, announcements: redis.client.PubSub
) -> None:
    assert registry.latest_version() is None
    assert registry.versions() == []
    published = [registry.publish(_weights(i), _meta(i)) for i in range(3)]
    assert published == [1, 2, 3]
    assert registry.latest_version() == 3
    assert registry.versions() == [1, 2, 3]
    assert [_next_announcement(announcements) for _ in range(3)] == [b"1", b"2", b"3"]

    latest = registry.load()
    assert latest.version == 3
    assert latest.weights == _weights(2)
    assert latest.meta["step"] == 2
    assert latest.meta["model_args"] == {"n_levels": 2, "d": 8}
    assert latest.meta["offsets"] == {"samples": {"0": 20}}
    assert latest.meta["sha256"] == sha256_hex(_weights(2))
    assert (latest.meta["created_at"], latest.meta["version"]) == (1_700_000_000_500, 3)
    assert registry.load(1).weights == _weights(0)
    loaded = safetensors.numpy.load(latest.weights)
    assert loaded["expert.w"].shape == (8, 4)


def test_load_verifies_the_blob(
    registry: SnapshotRegistry, redis_client: redis.Redis, namespace: str
) -> None:
    keys = KeySpace(namespace)
    registry.publish(_weights(0), _meta(0))
    registry.publish(_weights(1), _meta(1))
    redis_client.setrange(keys.model_blob("ple", 2), 40, b"\x00garbage")
    with pytest.raises(CorruptSnapshot, match="sha256"):
        registry.load()
    with pytest.raises(CorruptSnapshot, match="sha256"):
        registry.load(2)
    redis_client.delete(keys.model_meta("ple", 1))
    with pytest.raises(CorruptSnapshot, match="metadata is missing"):
        registry.load(1)
    with pytest.raises(SnapshotNotFoundError):
        registry.load(99)


def test_load_before_any_publish_is_not_found(registry: SnapshotRegistry) -> None:
    with pytest.raises(SnapshotNotFoundError):
        registry.load()


def test_only_safetensors_and_json_metadata_are_accepted(registry: SnapshotRegistry) -> None:
    with pytest.raises(ValueError, match="safetensors"):
        registry.publish(pickle.dumps({"w": [1.0, 2.0]}), _meta(0))
    with pytest.raises(ValueError, match="set by the registry"):
        registry.publish(_weights(0), {"sha256": "forged"})
    assert registry.latest_version() is None
    assert registry.publish(_weights(0), _meta(0)) == 1  # rejected publishes used no version


def test_keeps_the_last_k_versions(
    registry: SnapshotRegistry, redis_client: redis.Redis, namespace: str
) -> None:
    keys = KeySpace(namespace)
    for i in range(6):
        registry.publish(_weights(i), _meta(i))
    assert registry.versions() == [4, 5, 6]
    for gone in (1, 2, 3):
        assert redis_client.exists(keys.model_blob("ple", gone), keys.model_meta("ple", gone)) == 0
    assert [registry.load(v).meta["step"] for v in (4, 5, 6)] == [3, 4, 5]


def test_rollback_flips_latest_back_and_announces(
    registry: SnapshotRegistry, announcements: redis.client.PubSub, redis_url: str, namespace: str
) -> None:
    for i in range(3):
        registry.publish(_weights(i), _meta(i))
    assert [_next_announcement(announcements) for _ in range(3)] == [b"1", b"2", b"3"]
    assert registry.rollback(1) == 3
    assert _next_announcement(announcements) == b"1"
    assert registry.latest_version() == 1
    assert registry.load().weights == _weights(0)
    # pruning never removes the version latest points at, even outside the newest K
    with redis.Redis.from_url(redis_url) as other:
        assert SnapshotRegistry(other, "ple", namespace, keep=1).prune() == [2]
    assert registry.versions() == [1, 3]
    assert registry.load().version == 1
    # a new publish supersedes the rollback
    assert registry.publish(_weights(9), _meta(9)) == 4
    assert registry.latest_version() == 4


def test_rollback_refuses_missing_or_corrupt_versions(
    registry: SnapshotRegistry, redis_client: redis.Redis, namespace: str
) -> None:
    for i in range(2):
        registry.publish(_weights(i), _meta(i))
    with pytest.raises(SnapshotNotFoundError):
        registry.rollback(7)
    redis_client.set(KeySpace(namespace).model_blob("ple", 1), _weights(5))
    with pytest.raises(CorruptSnapshot):
        registry.rollback(1)
    assert registry.latest_version() == 2


def _publish_many(
    url: str, namespace: str, keep: int, who: str, n: int, barrier: threading.Barrier
) -> dict[int, tuple[str, int]]:
    with redis.Redis.from_url(url) as client:
        registry = SnapshotRegistry(client, "ple", namespace, keep=keep)
        barrier.wait()
        return {registry.publish(_weights(i), {"who": who, "i": i}): (who, i) for i in range(n)}


@pytest.mark.parametrize("keep", [100, 2])
def test_concurrent_publishers_never_lose_or_duplicate_a_version(
    redis_url: str, redis_client: redis.Redis, namespace: str, keep: int
) -> None:
    n = 15
    barrier = threading.Barrier(2)
    results: dict[str, dict[int, tuple[str, int]]] = {}

    def run(who: str) -> None:
        results[who] = _publish_many(redis_url, namespace, keep, who, n, barrier)

    threads = [threading.Thread(target=run, args=(who,)) for who in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert set(results) == {"a", "b"}
    versions = list(results["a"]) + list(results["b"])
    assert sorted(versions) == list(range(1, 2 * n + 1))  # no version lost or given twice
    owner = results["a"] | results["b"]
    registry = SnapshotRegistry(redis_client, "ple", namespace, keep=keep)
    assert registry.latest_version() == 2 * n  # the highest version wins the latest pointer
    assert registry.versions() == versions_expected(2 * n, keep)
    for version in registry.versions():
        snapshot = registry.load(version)
        who, i = owner[version]
        assert (snapshot.meta["who"], snapshot.meta["i"]) == (who, i)
        assert snapshot.weights == _weights(i)


def versions_expected(total: int, keep: int) -> list[int]:
    return list(range(max(1, total - keep + 1), total + 1))


async def test_async_reader_matches_the_sync_registry(
    registry: SnapshotRegistry, aregistry: AsyncSnapshotRegistry
) -> None:
    assert await aregistry.latest_version() is None
    with pytest.raises(SnapshotNotFoundError):
        await aregistry.load()
    for i in range(2):
        registry.publish(_weights(i), _meta(i))
    assert await aregistry.latest_version() == 2
    assert await aregistry.versions() == [1, 2]
    assert await aregistry.load() == registry.load()
    assert (await aregistry.load(1)).weights == _weights(0)


async def test_updates_are_pushed_by_announcements(
    registry: SnapshotRegistry, aregistry: AsyncSnapshotRegistry
) -> None:
    registry.publish(_weights(0), _meta(0))
    # a poll interval far above the wait: only the announcement can deliver in time
    async with contextlib.aclosing(aregistry.updates(poll_interval_s=60.0)) as updates:
        assert await asyncio.wait_for(anext(updates), 5.0) == 1
        pending = asyncio.ensure_future(anext(updates))
        await asyncio.sleep(0.05)  # let it subscribe-wait
        await asyncio.to_thread(registry.publish, _weights(1), _meta(1))
        assert await asyncio.wait_for(pending, 5.0) == 2
        pending = asyncio.ensure_future(anext(updates))
        await asyncio.sleep(0.05)
        await asyncio.to_thread(registry.rollback, 1)
        assert await asyncio.wait_for(pending, 5.0) == 1


async def test_updates_fall_back_to_polling(
    registry: SnapshotRegistry,
    aregistry: AsyncSnapshotRegistry,
    redis_client: redis.Redis,
    namespace: str,
) -> None:
    async with contextlib.aclosing(aregistry.updates(poll_interval_s=0.1)) as updates:
        pending = asyncio.ensure_future(anext(updates))
        await asyncio.sleep(0.05)
        assert not pending.done()  # nothing published yet: nothing to yield
        registry.publish(_weights(0), _meta(0))
        registry.publish(_weights(1), _meta(1))
        assert await asyncio.wait_for(pending, 5.0) in (1, 2)
        # flip latest without an announcement (as if the message were lost)
        redis_client.set(KeySpace(namespace).model_latest("ple"), 1)
        if await aregistry.latest_version() != 1:
            pytest.fail("latest did not flip")
        seen = await asyncio.wait_for(anext(updates), 5.0)
        assert seen in (1, 2)
        if seen == 2:  # the first read may have landed between the two publishes
            assert await asyncio.wait_for(anext(updates), 5.0) == 1


async def test_updates_survive_an_unreachable_redis(
    namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # no client-side retries, so every poll meets the outage at once
    client = redis.asyncio.Redis(
        host="127.0.0.1", port=port, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)
    )
    reader = AsyncSnapshotRegistry(client, "ple", namespace)
    try:
        async with contextlib.aclosing(reader.updates(poll_interval_s=0.05)) as updates:
            # it keeps polling instead of raising; nothing to yield while Redis is away
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(anext(updates), 0.5)
    finally:
        await client.aclose()
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1  # one warning per outage, not one per poll
