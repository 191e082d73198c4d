"""The scorer's ASGI app factory: ``create_app(settings)``, run by uvicorn (``mtlstream serve``).

The lifespan opens two Redis clients (features: a short timeout and no retries, so a lost Redis
costs a request nothing but its features; snapshots: a long timeout for multi-MB blobs), starts
the snapshot watcher, the Redis probe and, when enabled, the impression logger, and closes
everything on shutdown. Nothing is served before the first snapshot is built: ``/v1/rank`` and
``/health`` answer 503 until then.

Examples
--------
>>> app = create_app(ServingSettings())
>>> sorted(r.path for r in app.routes)
['/health', '/metrics', '/v1/model', '/v1/rank']
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis.asyncio
import torch
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from starlette.applications import Starlette

from feature_store.pipe import RawPipeline
from feature_store.registry import AsyncSnapshotRegistry
from feature_store.store import AsyncFeatureStore
from serving.features import FeatureReader, ItemCache, RedisHealth
from serving.impressions import ImpressionLogger, ImpressionSink, KafkaSink
from serving.metrics import ServingMetrics
from serving.request import RequestLimits
from serving.routes import ROUTES, ServingState
from serving.settings import ServingSettings
from serving.swap import ModelBuilder, ModelHolder, SnapshotWatcher

__all__ = ["create_app", "feature_client", "registry_client"]

logger = logging.getLogger(__name__)


def feature_client(settings: ServingSettings) -> redis.asyncio.Redis:
    """The request path's client: fails fast (timeout, no retries) so defaults take over."""
    return redis.asyncio.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        retry=Retry(NoBackoff(), 0),
    )


def registry_client(settings: ServingSettings) -> redis.asyncio.Redis:
    """The snapshot watcher's client: blobs are megabytes, so a generous timeout."""
    return redis.asyncio.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.registry_timeout_s,
        socket_connect_timeout=settings.registry_timeout_s,
        retry=Retry(NoBackoff(), 1),
    )


def _state_of(app: Starlette) -> ServingState:
    state: ServingState = app.state.serving
    return state


def _spawn(state: ServingState, coro: Coroutine[Any, Any, None], name: str) -> None:
    task = asyncio.create_task(coro, name=name)
    task.add_done_callback(_report_crash)
    state.tasks.append(task)


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("background task %s died", task.get_name(), exc_info=task.exception())


def _pipe(settings: ServingSettings) -> tuple[RawPipeline | None, str]:
    """The raw read pipeline, or redis-py's when the URL needs what it lacks (TLS, ...)."""
    if settings.read_path != "raw":
        return None, settings.read_path
    try:
        return RawPipeline(settings.redis_url, settings.redis_timeout_s, max_idle=32), "raw"
    except ValueError as exc:
        logger.warning("feature reads fall back to redis-py's pipeline: %s", exc)
        return None, "pipeline"


def _start(
    state: ServingState,
    features: redis.asyncio.Redis,
    snapshots: redis.asyncio.Redis,
    sink: ImpressionSink | None,
) -> None:
    settings, metrics = state.settings, state.metrics
    torch.set_num_threads(settings.threads)
    store = AsyncFeatureStore(features, settings.namespace)
    state.health = RedisHealth(features, metrics)
    state.pipe, read_path = _pipe(settings)
    cache = None
    if settings.item_cache_s > 0:
        cache = ItemCache(settings.item_cache_s, settings.item_cache_size)
    state.reader = FeatureReader(store, state.health, metrics, read_path, state.pipe, cache)
    registry = AsyncSnapshotRegistry(snapshots, settings.model_name, settings.namespace)
    builder = ModelBuilder(
        settings.runtime, state.weights, settings.extra_features, settings.threads, metrics
    )
    watcher = SnapshotWatcher(registry, state.holder, builder, metrics, settings.poll_interval_s)
    if settings.offload:
        state.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtl-infer")
    _spawn(state, watcher.run(), "snapshot-watcher")
    _spawn(state, state.health.run(settings.redis_probe_s), "redis-probe")
    if settings.impressions or sink is not None:
        if sink is None:
            sink = KafkaSink(settings.kafka_bootstrap, settings.impressions_topic, metrics)
        state.impressions = ImpressionLogger(sink, metrics, settings.impressions_queue)
        _spawn(state, state.impressions.run(), "impression-logger")


async def _cancel(tasks: list[asyncio.Task[None]], timeout_s: float) -> list[asyncio.Task[None]]:
    """Cancel tasks and wait up to ``timeout_s``; return those still running."""
    for task in tasks:
        task.cancel()
    if not tasks:
        return []
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    return [t for t in tasks if t in pending]


async def _stop(state: ServingState, clients: list[redis.asyncio.Redis]) -> None:
    # redis-py's pub/sub read can miss a cancellation right after a reconnect (seen after a Redis
    # restart); closing the clients below ends any such read, so wait for those tasks again after
    stuck = await _cancel(state.tasks, timeout_s=2.0)
    if state.impressions is not None:
        await state.impressions.close()
    if state.executor is not None:
        state.executor.shutdown(wait=True)
    for client in clients:
        await client.aclose()
    if state.pipe is not None:
        await state.pipe.aclose()
    stuck = await _cancel(stuck, timeout_s=5.0)
    if stuck:
        logger.warning("tasks did not stop: %s", ", ".join(t.get_name() for t in stuck))
    state.tasks.clear()


def create_app(
    settings: ServingSettings,
    *,
    redis_client: redis.asyncio.Redis | None = None,
    impression_sink: ImpressionSink | None = None,
    metrics: ServingMetrics | None = None,
) -> Starlette:
    """Build the scorer app.

    Parameters
    ----------
    settings
        The scorer's settings (``from_env(ServingSettings)``).
    redis_client
        Client for feature reads (default: one from ``settings.redis_url`` that fails fast).
        Closed on shutdown either way.
    impression_sink
        Where impressions go; given, it turns impression logging on (default: Kafka when
        ``settings.impressions``).
    metrics
        Metrics to update (default: fresh, in their own registry).
    """
    state = ServingState(
        settings=settings,
        metrics=metrics if metrics is not None else ServingMetrics(),
        holder=ModelHolder(),
        limits=RequestLimits(
            settings.max_candidates,
            settings.max_id_bytes,
            settings.max_body_bytes,
            settings.max_context_bytes,
        ),
        weights=settings.fusion,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        features = redis_client if redis_client is not None else feature_client(settings)
        snapshots = registry_client(settings)
        _start(_state_of(app), features, snapshots, impression_sink)
        logger.info(
            "scorer starting model=%s namespace=%s runtime=%s read_path=%s offload=%s",
            settings.model_name,
            settings.namespace,
            settings.runtime,
            settings.read_path,
            settings.offload,
        )
        try:
            yield
        finally:
            await _stop(_state_of(app), [features, snapshots])
            logger.info("scorer stopped")

    app = Starlette(routes=ROUTES, lifespan=lifespan)
    app.state.serving = state
    return app
