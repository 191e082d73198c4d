"""Hot swap under concurrent load: versions change many times, no request fails or mixes versions.

Each published version predicts a constant ctr of ``version / 1000`` for every item (its tower's
last layer zeroed, its bias set), so a response that mixed two models would show a ctr that does
not match its ``model_version``.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import redis

from feature_store.registry import SnapshotRegistry
from feature_store.store import FeatureStore
from tests.serving_support import (
    constant_ctr_model,
    publish,
    running_app,
    serving_settings,
    wait_for_version,
)

pytestmark = pytest.mark.integration

VERSIONS = 25
CLIENTS = 6


def _ctr_of(version: int) -> float:
    return version / 1000.0


async def _hammer(
    client: httpx.AsyncClient, stop: asyncio.Event, seen: list[int], k: int
) -> list[str]:
    """Send requests until told to stop; return every problem found."""
    problems: list[str] = []
    candidates = [f"i{j}" for j in range(k, k + 20)]
    last = 0
    while not stop.is_set():
        response = await client.post(
            "/v1/rank", json={"user_id": f"u{k}", "candidates": candidates}
        )
        if response.status_code != 200:
            problems.append(f"status {response.status_code}: {response.text[:200]}")
            continue
        body = response.json()
        version = body["model_version"]
        seen.append(version)
        ctrs = {round(item["tasks"]["ctr"] * 1000) for item in body["items"]}
        if ctrs != {version} or len(body["items"]) != len(candidates):
            problems.append(f"version {version} answered with ctr x1000 {sorted(ctrs)}")
        if response.headers["x-model-version"] != str(version):
            problems.append(f"header {response.headers['x-model-version']} != body {version}")
        if version < last:  # no rollback was published: versions never go backwards
            problems.append(f"version {version} after {last}")
        last = version
        await asyncio.sleep(0)
    return problems


def _publish_many(registry: SnapshotRegistry, first: int) -> list[int]:
    published = []
    for step in range(VERSIONS):
        version_expected = first + step
        model = constant_ctr_model(_ctr_of(version_expected), seed=step)
        published.append(publish(registry, model, step=step))
        time.sleep(0.03)
    return published


async def test_versions_swap_under_load_without_failures_or_mixed_responses(
    redis_url: str, namespace: str, redis_client: redis.Redis
) -> None:
    registry = SnapshotRegistry(redis_client, "ple", namespace, keep=3)
    FeatureStore(redis_client, namespace).write(
        "item", [(f"i{j}", {"item_price": float(j)}, 1) for j in range(40)]
    )
    first = publish(registry, constant_ctr_model(_ctr_of(1)))
    assert first == 1
    settings = serving_settings(redis_url, namespace, poll_interval_s=0.5)
    async with running_app(settings) as (_, client):
        await wait_for_version(client, first)
        stop = asyncio.Event()
        seen: list[int] = []
        hammers = [asyncio.create_task(_hammer(client, stop, seen, k)) for k in range(CLIENTS)]
        # a separate publisher (a learner) in a thread, so the event loop keeps serving
        published = await asyncio.to_thread(_publish_many, registry, first + 1)
        await wait_for_version(client, published[-1])
        await asyncio.sleep(0.2)
        stop.set()
        problems = [p for batch in await asyncio.gather(*hammers) for p in batch]
        metrics = (await client.get("/metrics")).text
    assert published == list(range(2, VERSIONS + 2))
    assert problems == []
    assert len(seen) > 50
    assert len(set(seen)) >= 3  # requests really ran across several swaps
    assert seen[-1] == published[-1]
    swaps = float(metrics.split("\nmtl_serve_model_swaps_total ")[1].split()[0])
    assert swaps >= 3
    assert 'mtl_serve_requests_total{status="200"}' in metrics
    assert 'status="500"' not in metrics and 'status="503"' not in metrics
