"""HTTP routes of the scorer: POST /v1/rank, GET /health, GET /metrics, GET /v1/model.

Errors are JSON ``{"error": {"code", "message", "field"}}``: 400 for a body that is not JSON, 413
for one over ``MTL_SERVE_MAX_BODY_BYTES``, 422 for JSON that is not a valid request (wrong types,
missing fields, empty or oversized candidate lists, bad ids, bad boost), 503 before the first
model is loaded. Unknown top-level fields are ignored and named in ``X-Ignored-Fields``. A
request scored with default features because Redis was unavailable carries
``X-Degraded: default-features``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from feature_store.pipe import RawPipeline
from feature_store.store import FieldColumns
from serving.errors import RequestError
from serving.features import FeatureReader, RedisHealth
from serving.impressions import ImpressionLogger, ServedRequest
from serving.metrics import ServingMetrics
from serving.request import RankRequest, RequestLimits, parse_rank_request
from serving.scorer import LoadedModel, ScoredBatch, context_boost, rank_items
from serving.settings import ServingSettings
from serving.swap import ModelHolder

__all__ = ["ROUTES", "ServingState", "describe_model", "request_id_of"]

logger = logging.getLogger(__name__)

_JSON = "application/json"
_MAX_REQUEST_ID = 128


@dataclass
class ServingState:
    """Everything the routes share; built by ``create_app``, clients filled in by its lifespan."""

    settings: ServingSettings
    metrics: ServingMetrics
    holder: ModelHolder
    limits: RequestLimits
    weights: Mapping[str, float]
    pipe: RawPipeline | None = None
    reader: FeatureReader | None = None
    health: RedisHealth | None = None
    impressions: ImpressionLogger | None = None
    # single worker thread for inference when MTL_SERVE_OFFLOAD is on
    executor: ThreadPoolExecutor | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def _state(request: Request) -> ServingState:
    state: ServingState = request.app.state.serving
    return state


def _json(body: object, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, headers=headers, media_type=_JSON)


def request_id_of(request: Request) -> str:
    """The caller's ``X-Request-ID`` when usable as an id, else a fresh random one."""
    given = request.headers.get("x-request-id", "")
    if 0 < len(given) <= _MAX_REQUEST_ID and given.isprintable() and " " not in given:
        return given
    return uuid.uuid4().hex


async def _body(request: Request, limits: RequestLimits) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise RequestError(
            413,
            "body_too_large",
            f"request body is {declared} bytes, over the limit of {limits.max_body_bytes}",
        )
    return await request.body()


async def _score(
    state: ServingState, model: LoadedModel, req: RankRequest
) -> tuple[ScoredBatch, FieldColumns | None]:
    """Features (one Redis round trip) -> model -> fusion; ``None`` features = defaults used."""
    boost = context_boost(req.context, req.candidates, state.settings.boost_field)
    if state.reader is None:
        raise RuntimeError("the app's lifespan has not started (no feature reader)")
    started = time.perf_counter()
    read = asyncio.ensure_future(state.reader.read(req.user_id, req.candidates, model.fields))
    # one turn of the loop: the read sends its request; while Redis answers (about half of the
    # read's time at 500 candidates) encode what needs only the request
    await asyncio.sleep(0)
    try:
        ids = model.encode_ids(req.user_id, req.candidates)
    except BaseException:
        read.cancel()
        raise
    found = await read
    state.metrics.stage.labels("features").observe(time.perf_counter() - started)
    started = time.perf_counter()
    args = (req.user_id, req.candidates, found, req.context, state.weights, boost, ids)
    if state.executor is None:
        scored = model.score_request(*args)
    else:
        loop = asyncio.get_running_loop()
        scored = await loop.run_in_executor(state.executor, model.score_request, *args)
    state.metrics.stage.labels("inference").observe(time.perf_counter() - started)
    return scored, found


async def _rank(state: ServingState, request: Request) -> Response:
    req = parse_rank_request(await _body(request, state.limits), state.limits)
    model = state.holder.current  # read once: this request uses this version throughout
    if model is None:
        raise RequestError(503, "no_model", "no model snapshot is loaded yet")
    scored, found = await _score(state, model, req)
    order, items = rank_items(req.candidates, scored, req.top_k)
    request_id = request_id_of(request)
    headers = {"x-request-id": request_id, "x-model-version": str(model.version)}
    if req.ignored:
        headers["x-ignored-fields"] = ",".join(req.ignored)
    if found is None:
        headers["x-degraded"] = "default-features"
    if state.impressions is not None:
        served = ServedRequest(
            request_id=request_id,
            user_id=req.user_id,
            ts_ms=int(time.time() * 1000),
            context=req.context,
            model_version=model.version,
            fields=model.fields,
            item_ids=req.candidates,
            found=found,
            order=order,
        )
        state.impressions.offer(served)
    state.metrics.candidates.inc(len(req.candidates))
    return _json({"model_version": model.version, "items": items}, headers=headers)


async def rank(request: Request) -> Response:
    """``POST /v1/rank``: score and order the candidates for a user."""
    state = _state(request)
    started = time.perf_counter()
    try:
        response = await _rank(state, request)
    except RequestError as exc:
        state.metrics.errors.labels(exc.code).inc()
        response = _json(exc.to_dict(), status=exc.status)
    except Exception:
        logger.exception("ranking failed")
        state.metrics.errors.labels("internal").inc()
        error = RequestError(500, "internal", "internal error; see the scorer's log")
        response = _json(error.to_dict(), status=500)
    state.metrics.latency.observe(time.perf_counter() - started)
    state.metrics.requests.labels(str(response.status_code)).inc()
    return response


async def health(request: Request) -> Response:
    """``GET /health``: 200 when a model is loaded and Redis answers a PING, else 503."""
    state = _state(request)
    model = state.holder.current
    redis_up = state.health is not None and await state.health.probe()
    ok = model is not None and redis_up
    body = {
        "status": "ok" if ok else "unhealthy",
        "model_version": model.version if model is not None else None,
        "runtime": model.runtime.name if model is not None else None,
        "redis": "up" if redis_up else "down",
    }
    return _json(body, status=200 if ok else 503)


async def metrics(request: Request) -> Response:
    """``GET /metrics``: Prometheus exposition."""
    body, content_type = _state(request).metrics.render()
    return Response(body, media_type=content_type)


def describe_model(model: LoadedModel, now_s: float) -> dict[str, Any]:
    """The ``GET /v1/model`` body of a served model."""
    created = model.created_at_ms
    return {
        "model_version": model.version,
        "runtime": model.runtime.name,
        "created_at": created,
        "age_s": None if created is None else max(0.0, now_s - created / 1000.0),
        "tasks": dict(model.task_kinds),
        "features": model.spec.to_dict(),
        "fields": list(model.fields),
        "step": model.meta.get("step"),
        "metrics": model.meta.get("metrics"),
        "model_args": model.meta.get("model_args"),
    }


async def model_info(request: Request) -> Response:
    """``GET /v1/model``: the served snapshot (version, runtime, tasks, features, metrics)."""
    state = _state(request)
    model = state.holder.current
    if model is None:
        error = RequestError(503, "no_model", "no model snapshot is loaded yet")
        return _json(error.to_dict(), status=503)
    body = describe_model(model, time.time())
    body["model_name"] = state.settings.model_name
    body["fusion_weights"] = dict(state.weights)
    # when this version started serving, and the recent swaps (end-to-end freshness)
    body["loaded_at"] = state.holder.loaded_at_ms
    body["swaps"] = list(state.holder.swaps)
    return _json(body)


ROUTES = [
    Route("/v1/rank", rank, methods=["POST"]),
    Route("/v1/model", model_info, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
