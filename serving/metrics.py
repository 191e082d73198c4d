"""Prometheus metrics of one scorer app, in their own registry (tests build many apps)."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["LATENCY_BUCKETS", "ServingMetrics"]

#: Request latency buckets (s): fine around the 4 ms p50 / 12 ms p99 goals.
LATENCY_BUCKETS = (
    0.001,
    0.002,
    0.003,
    0.004,
    0.005,
    0.006,
    0.008,
    0.010,
    0.012,
    0.015,
    0.020,
    0.030,
    0.050,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


class ServingMetrics:
    """Every metric the scorer exports; ``render()`` is the ``/metrics`` body."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "mtl_serve_request_seconds",
            "POST /v1/rank latency, body read to response built",
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.stage = Histogram(
            "mtl_serve_stage_seconds",
            "time per request stage: features (Redis) or inference (encode + model + fusion)",
            ["stage"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.requests = Counter(
            "mtl_serve_requests",
            "ranking requests answered, by HTTP status",
            ["status"],
            registry=r,
        )
        self.errors = Counter(
            "mtl_serve_errors",
            "ranking requests refused or failed, by error code",
            ["code"],
            registry=r,
        )
        self.candidates = Counter("mtl_serve_candidates", "candidates scored", registry=r)
        self.unknown = Counter(
            "mtl_serve_unknown_entities",
            "users / items without stored features (scored with defaults)",
            ["entity"],
            registry=r,
        )
        self.default_features = Counter(
            "mtl_serve_default_feature_requests",
            "requests scored with default features because Redis was unavailable",
            registry=r,
        )
        self.redis_up = Gauge("mtl_serve_redis_up", "1 while the feature store answers", registry=r)
        self.redis_errors = Counter(
            "mtl_serve_redis_errors", "failed feature reads and probes", registry=r
        )
        self.model_version = Gauge(
            "mtl_serve_model_version", "snapshot version being served (0: none)", registry=r
        )
        self.model_created_ms = 0
        self.model_age = Gauge(
            "mtl_serve_model_age_seconds",
            "seconds since the served snapshot was published (-1: none or unknown)",
            registry=r,
        )
        self.model_age.set_function(self._model_age)
        self.swaps = Counter("mtl_serve_model_swaps", "snapshots swapped in", registry=r)
        self.rejected = Counter(
            "mtl_serve_snapshots_rejected",
            "snapshots refused (corrupt, unloadable, incompatible): the previous model serves on",
            ["reason"],
            registry=r,
        )
        self.onnx_fallbacks = Counter(
            "mtl_serve_onnx_fallbacks", "snapshots served by torch because ONNX failed", registry=r
        )
        self.impressions_sent = Counter(
            "mtl_serve_impressions_sent", "impressions handed to the Kafka producer", registry=r
        )
        self.impressions_dropped = Counter(
            "mtl_serve_impressions_dropped",
            "impressions dropped because the queue was full (Kafka slow or down)",
            registry=r,
        )
        self.impressions_failed = Counter(
            "mtl_serve_impressions_failed", "impressions the producer failed to deliver", registry=r
        )
        self.impressions_queued = Gauge(
            "mtl_serve_impressions_queued", "impressions waiting in the queue", registry=r
        )
        self.clock: Callable[[], float] = time.time

    def _model_age(self) -> float:
        if self.model_created_ms <= 0:
            return -1.0
        return max(0.0, self.clock() - self.model_created_ms / 1000.0)

    def set_model(self, version: int, created_at_ms: int | None) -> None:
        """Record the snapshot now being served."""
        self.model_version.set(version)
        self.model_created_ms = created_at_ms or 0

    def render(self) -> tuple[bytes, str]:
        """Return the exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
