"""Helpers shared by the scorer's tests: tiny models, snapshots, a running app."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
import redis
import safetensors.torch
import torch
from starlette.applications import Starlette

from feature_store.registry import Snapshot, SnapshotRegistry, sha256_hex
from learner.models import RankingModel, build_model
from serving.app import create_app
from serving.settings import ServingSettings, from_env

#: A PLE small enough to build in milliseconds, with the simulator's feature names.
TINY_ARGS: dict[str, Any] = {
    "arch": "ple",
    "config": {"n_levels": 1, "n_task_experts": 1, "n_shared_experts": 1, "expert_hidden": [8]},
    "tower_hidden": [8],
    "features": {
        "categorical": [
            {"name": "user_id", "buckets": 97, "dim": 4},
            {"name": "item_id", "buckets": 97, "dim": 4},
            {"name": "user_segment", "buckets": 17, "dim": 2},
            {"name": "item_category", "buckets": 17, "dim": 2},
        ],
        "dense": ["user_activity", "item_price", "item_age_h", "item_ctr_1h"],
    },
}


def tiny_model(seed: int = 0, args: Mapping[str, Any] | None = None) -> RankingModel:
    """A freshly initialised tiny model with fitted-looking normalisation statistics."""
    torch.manual_seed(seed)
    model = build_model(dict(args or TINY_ARGS))
    with torch.no_grad():
        model.encoder.norm.mean.copy_(torch.tensor([5.0, 50.0, 24.0, 0.1], dtype=torch.float64))
        model.encoder.norm.var.copy_(torch.tensor([4.0, 400.0, 100.0, 0.01], dtype=torch.float64))
    return model.eval()


def constant_ctr_model(ctr: float, seed: int = 0) -> RankingModel:
    """A tiny model whose ctr prediction is ``ctr`` for every input (its version's signature)."""
    model = tiny_model(seed)
    state = model.state_dict()
    with torch.no_grad():
        state["towers.ctr.head.weight"].zero_()  # state_dict tensors share the parameters
        state["towers.ctr.head.bias"].fill_(math.log(ctr / (1.0 - ctr)))
    return model


def snapshot_meta(model: RankingModel, step: int = 0) -> dict[str, Any]:
    """The metadata a learner publishes with a snapshot."""
    return {
        "model_args": model.model_args,
        "feature_spec": model.args.features.to_dict(),
        "step": step,
        "metrics": {"ctr_auc": 0.5},
    }


def publish(registry: SnapshotRegistry, model: RankingModel, step: int = 0) -> int:
    """Publish a model's weights (safetensors) and args; return the version."""
    return registry.publish(safetensors.torch.save(model.state_dict()), snapshot_meta(model, step))


def in_memory_snapshot(model: RankingModel, version: int = 1) -> Snapshot:
    """A verified snapshot as the registry would load it, without Redis."""
    blob = safetensors.torch.save(model.state_dict())
    meta = {**snapshot_meta(model), "sha256": sha256_hex(blob), "version": version}
    return Snapshot(version, blob, meta)


def serving_settings(redis_url: str, namespace: str, **overrides: Any) -> ServingSettings:
    """Settings for a test scorer: torch runtime, fast polling and probing."""
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "namespace": namespace,
        "runtime": "torch",
        "poll_interval_s": 0.2,
        "redis_probe_s": 0.1,
        "max_candidates": 50,
    }
    values.update(overrides)
    return from_env(ServingSettings, {}, **values)


@contextlib.asynccontextmanager
async def running_app(
    settings: ServingSettings, **kwargs: Any
) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    """Run the app's lifespan and yield it with an ASGI client (real Redis behind it)."""
    app = create_app(settings, **kwargs)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://scorer") as client:
            yield app, client


async def wait_for_version(client: httpx.AsyncClient, version: int, timeout_s: float = 20) -> None:
    """Poll /v1/model until the scorer serves ``version``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = await client.get("/v1/model")
        if response.status_code == 200 and response.json()["model_version"] == version:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the scorer did not serve version {version} within {timeout_s}s")


def clear(client: redis.Redis, namespace: str) -> None:
    """Delete every key under a namespace."""
    keys = list(client.scan_iter(match=f"{namespace}*", count=1000))
    if keys:
        client.delete(*keys)
