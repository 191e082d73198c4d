"""Settings of the scorer process (`mtlstream serve`), read from environment variables.

Examples
--------
>>> settings = from_env(ServingSettings, {"MTL_FUSION_WEIGHTS": "ctr=1,ysl=0.5"})
>>> settings.fusion
{'ctr': 1.0, 'ysl': 0.5}
>>> parse_weights("ctr=1, cvr=0.5")
{'ctr': 1.0, 'cvr': 0.5}
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from feature_store.keys import MAX_PART_BYTES, KeySpace, check_part
from mtlstream.errors import SettingsError
from mtlstream.settings import DEFAULT_KAFKA, DEFAULT_REDIS, env_field, from_env

__all__ = ["READ_PATHS", "RUNTIMES", "ServingSettings", "from_env", "parse_weights"]

#: Model runtimes: "auto" = ONNX Runtime when importable (it wins the benchmark), else torch.
RUNTIMES = ("auto", "onnx", "torch")
#: Feature read paths: one HMGET per entity of the model's fields in one round trip over
#: feature_store.pipe.RawPipeline ("raw", the default); redis-py's pipeline of HGETALLs
#: ("pipeline"); one awaited HGETALL per key ("naive", the benchmark's baseline).
READ_PATHS = ("raw", "pipeline", "naive")


def parse_weights(text: str) -> dict[str, float]:
    """Parse fusion weights ``"task=w,task=w"``; weights must be finite (0 drops a task)."""
    weights: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, raw = part.partition("=")
        name = name.strip()
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not sep or not name or not math.isfinite(value):
            raise SettingsError(f"fusion weight {part!r}: expected task=number, e.g. 'ctr=1'")
        if name in weights:
            raise SettingsError(f"fusion weight for task {name!r} given twice")
        weights[name] = value
    return weights


@dataclass(frozen=True)
class ServingSettings:
    """Everything `mtlstream serve` needs; every field has an environment variable."""

    # where uvicorn listens
    host: str = env_field("127.0.0.1", "MTL_SERVE_HOST", "address to listen on")
    port: int = env_field(8000, "MTL_SERVE_PORT", "HTTP port")
    # Redis holding the features and the model snapshots
    redis_url: str = env_field(DEFAULT_REDIS, "REDIS_URL", "Redis URL")
    namespace: str = env_field("mtl:", "MTL_NAMESPACE", "Redis key prefix")
    # which model's snapshots to follow
    model_name: str = env_field("ple", "MTL_MODEL_NAME", "snapshot registry model name")
    # request limits: larger requests are answered 413 (bytes) or 422 (candidates, ids, context)
    max_candidates: int = env_field(1000, "MTL_SERVE_MAX_CANDIDATES", "candidates per request")
    max_id_bytes: int = env_field(MAX_PART_BYTES, "MTL_SERVE_MAX_ID_BYTES", "id length (bytes)")
    max_body_bytes: int = env_field(1 << 20, "MTL_SERVE_MAX_BODY_BYTES", "request body bytes")
    max_context_bytes: int = env_field(4096, "MTL_SERVE_MAX_CONTEXT_BYTES", "context JSON bytes")
    # PLE eq. 1: score = prod_k q_k ** w_k * f(context), see serving.scorer.fuse
    fusion_weights: str = env_field(
        "ctr=1,cvr=0.5,ysl=0.2", "MTL_FUSION_WEIGHTS", "fusion weights task=w,..."
    )
    # context field holding f(context): a number for every candidate or {item_id: number}
    boost_field: str = env_field("boost", "MTL_FUSION_BOOST_FIELD", "context multiplier ('' off)")
    # model runtime, and threads of torch / ONNX Runtime (pinned: the box has 2 cores)
    runtime: str = env_field("auto", "MTL_SERVE_RUNTIME", "auto | onnx | torch")
    threads: int = env_field(1, "MTL_SERVE_THREADS", "intra-op threads for inference")
    # run encode + inference + fusion in a worker thread (frees the event loop meanwhile)
    offload: bool = env_field(False, "MTL_SERVE_OFFLOAD", "inference off the event loop")
    read_path: str = env_field("raw", "MTL_SERVE_READ_PATH", "raw | pipeline | naive")
    # keep item rows this many seconds (0: off, every request reads every candidate)
    item_cache_s: float = env_field(0.0, "MTL_SERVE_ITEM_CACHE_S", "item row cache TTL (s)")
    item_cache_size: int = env_field(200_000, "MTL_SERVE_ITEM_CACHE_SIZE", "item rows cached")
    # feature fields read (and logged with impressions) beyond those the model's spec uses
    extra_features: tuple[str, ...] = env_field((), "MTL_SERVE_EXTRA_FEATURES", "extra fields")
    # a feature read slower than this is abandoned: the request is scored with defaults
    redis_timeout_s: float = env_field(0.25, "MTL_SERVE_REDIS_TIMEOUT_S", "feature read timeout")
    # while Redis is down, requests skip it; a probe checks it this often
    redis_probe_s: float = env_field(1.0, "MTL_SERVE_REDIS_PROBE_S", "Redis probe interval (s)")
    # snapshot polling (pub/sub announcements are the fast path)
    poll_interval_s: float = env_field(5.0, "MTL_SERVE_POLL_S", "snapshot poll interval (s)")
    registry_timeout_s: float = env_field(10.0, "MTL_SERVE_REGISTRY_TIMEOUT_S", "blob read (s)")
    # impression logging to Kafka through a bounded queue (full queue: dropped and counted)
    impressions: bool = env_field(False, "MTL_SERVE_IMPRESSIONS", "log served impressions")
    kafka_bootstrap: str = env_field(DEFAULT_KAFKA, "KAFKA_BOOTSTRAP_SERVERS", "Kafka brokers")
    impressions_topic: str = env_field("impressions", "MTL_IMPRESSIONS_TOPIC", "topic")
    impressions_queue: int = env_field(10_000, "MTL_SERVE_IMPRESSIONS_QUEUE", "queue (records)")
    access_log: bool = env_field(False, "MTL_SERVE_ACCESS_LOG", "uvicorn access log")

    def __post_init__(self) -> None:
        """Check every field up front, so a bad setting fails at start, not per request."""
        if self.runtime not in RUNTIMES:
            raise SettingsError(
                f"MTL_SERVE_RUNTIME must be one of {RUNTIMES}, got {self.runtime!r}"
            )
        if self.read_path not in READ_PATHS:
            raise SettingsError(
                f"MTL_SERVE_READ_PATH must be one of {READ_PATHS}, got {self.read_path!r}"
            )
        KeySpace(self.namespace)
        check_part(self.model_name, "model name")
        if not 1 <= self.max_id_bytes <= MAX_PART_BYTES:
            raise SettingsError(f"MTL_SERVE_MAX_ID_BYTES must be in [1, {MAX_PART_BYTES}]")
        if self.item_cache_s < 0:
            raise SettingsError(f"MTL_SERVE_ITEM_CACHE_S must be >= 0, got {self.item_cache_s}")
        names = ("max_candidates", "max_body_bytes", "threads", "impressions_queue")
        for name in (*names, "item_cache_size"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("redis_timeout_s", "redis_probe_s", "poll_interval_s", "registry_timeout_s"):
            if not getattr(self, name) > 0:
                raise SettingsError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_context_bytes < 2:
            raise SettingsError("max_context_bytes must be >= 2 (room for '{}')")
        parse_weights(self.fusion_weights)

    @property
    def fusion(self) -> dict[str, float]:
        """The fusion weights by task."""
        return parse_weights(self.fusion_weights)

    @property
    def base_url(self) -> str:
        """URL of this scorer as a client on the same host reaches it."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"
