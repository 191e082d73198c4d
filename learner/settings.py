"""Settings of the learner daemon (`mtlstream learn`): one dataclass, one env var per field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from learner.losses import WEIGHTINGS, LossConfig
from mtlstream.errors import SettingsError
from mtlstream.settings import DEFAULT_KAFKA, DEFAULT_REDIS, env_field
from stream.events import SAMPLES

__all__ = ["DEVICES", "START_FROM", "LearnerSettings"]

DEVICES = ("auto", "cpu", "cuda")
#: Where to start reading a partition the checkpoint does not cover.
START_FROM = ("earliest", "latest", "committed")


def _json_object(raw: str, env: str) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise SettingsError(f"{env} must be a JSON object: {exc}") from exc
    if not isinstance(value, dict):
        raise SettingsError(f"{env} must be a JSON object, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class LearnerSettings:
    """Everything the learner daemon reads from its environment (flags override)."""

    # --- services
    kafka_bootstrap: str = env_field(DEFAULT_KAFKA, "KAFKA_BOOTSTRAP_SERVERS", "Kafka brokers")
    redis_url: str = env_field(DEFAULT_REDIS, "REDIS_URL", "Redis for snapshots and health")
    namespace: str = env_field("mtl:", "MTL_NAMESPACE", "Redis key prefix")
    samples_topic: str = env_field(SAMPLES, "MTL_SAMPLES_TOPIC", "topic of training samples")
    # consumer group: offsets are committed there after each checkpoint so lag is visible
    group_id: str = env_field("learner", "MTL_LEARNER_GROUP", "Kafka consumer group")
    # partitions this process owns, comma-separated; empty: every partition of the topic
    partitions: tuple[str, ...] = env_field((), "MTL_LEARNER_PARTITIONS", "owned partitions")
    # start of a partition the checkpoint does not cover: earliest | latest | committed
    start_from: str = env_field("earliest", "MTL_LEARNER_START", "offsets without checkpoint")
    # --- model
    model_name: str = env_field("ple", "MTL_MODEL_NAME", "snapshot name in the registry")
    arch: str = env_field("ple", "MTL_LEARNER_ARCH", "single|shared_bottom|omoe|mmoe|cgc|ple")
    # JSON object of ModelArgs overrides, e.g. {"config": {"n_levels": 1}, "esmm": false}
    model_args_json: str = env_field("", "MTL_LEARNER_MODEL_ARGS", "model args (JSON)")
    seed: int = env_field(0, "MTL_LEARNER_SEED", "weight init seed")
    # --- optimisation
    batch_size: int = env_field(4096, "MTL_LEARNER_BATCH_SIZE", "samples per micro-batch")
    # a partial batch is trained once its first record waited this long
    max_batch_wait_s: float = env_field(0.5, "MTL_LEARNER_MAX_BATCH_WAIT_S", "batch timeout")
    lr: float = env_field(3e-3, "MTL_LEARNER_LR", "Adam learning rate (dense parameters)")
    # hashed id rows see few updates each: they need a larger step than the dense layers
    embedding_lr: float = env_field(1e-2, "MTL_LEARNER_EMB_LR", "learning rate of embeddings")
    grad_clip: float = env_field(1.0, "MTL_LEARNER_GRAD_CLIP", "max grad norm (0: off)")
    # embeddings get sparse gradients and SparseAdam: only the rows of a batch are updated
    sparse_embeddings: bool = env_field(True, "MTL_LEARNER_SPARSE_EMB", "sparse embeddings")
    weighting: str = env_field("uwl", "MTL_LEARNER_WEIGHTING", "static | uwl | decay")
    # JSON object of the other LossConfig fields, e.g. {"weights": {"ysl": 0.5}}
    loss_config_json: str = env_field("", "MTL_LEARNER_LOSS_CONFIG", "loss config (JSON)")
    # --- snapshots, checkpoints, dedupe
    publish_every_s: float = env_field(30.0, "MTL_PUBLISH_EVERY_S", "snapshot period (0: off)")
    publish_every_samples: int = env_field(0, "MTL_PUBLISH_EVERY_SAMPLES", "(0: off)")
    keep: int = env_field(5, "MTL_SNAPSHOTS_KEEP", "snapshots kept in Redis")
    checkpoint_dir: Path = env_field(
        Path(".mtlstream/learner"), "MTL_CHECKPOINT_DIR", "checkpoint directory"
    )
    checkpoint_every_s: float = env_field(60.0, "MTL_CHECKPOINT_EVERY_S", "(0: off)")
    checkpoint_every_samples: int = env_field(0, "MTL_CHECKPOINT_EVERY_SAMPLES", "(0: off)")
    checkpoints_kept: int = env_field(2, "MTL_CHECKPOINTS_KEPT", "checkpoints kept on disk")
    # distinct sample ids remembered for dedupe (see learner.batching)
    dedupe_horizon: int = env_field(1_000_000, "MTL_DEDUPE_HORIZON", "dedupe horizon")
    # --- runtime
    device: str = env_field("auto", "MTL_LEARNER_DEVICE", "auto | cpu | cuda")
    # intra-op threads of torch; 0: one per core but one, which the consumer thread needs for
    # itself (on 2 cores, 2 torch threads fight it for a core and train ~5x slower than 1)
    torch_threads: int = env_field(0, "MTL_LEARNER_TORCH_THREADS", "torch threads (0: auto)")
    prefetch_batches: int = env_field(4, "MTL_LEARNER_PREFETCH", "decoded batches queued")
    max_samples: int = env_field(0, "MTL_LEARNER_MAX_SAMPLES", "stop after N records (0: off)")
    until_idle_s: float = env_field(0.0, "MTL_LEARNER_UNTIL_IDLE_S", "stop when idle (0: off)")
    # --- observability
    health_ttl_s: float = env_field(30.0, "MTL_LEARNER_HEALTH_TTL_S", "health key TTL (s)")
    log_every_s: float = env_field(10.0, "MTL_LEARNER_LOG_EVERY_S", "status line period (s)")
    # metrics history (JSONL) that `mtlstream report` reads; empty: <checkpoint_dir>/metrics.jsonl
    metrics_file: str = env_field("", "MTL_LEARNER_METRICS_FILE", "metrics history file")
    metrics_window: int = env_field(100_000, "MTL_LEARNER_METRICS_WINDOW", "window (samples)")
    auc_bins: int = env_field(4096, "MTL_LEARNER_AUC_BINS", "histogram AUC bins")

    def __post_init__(self) -> None:
        """Reject values the daemon cannot honour, naming the variable."""
        if not isinstance(self.checkpoint_dir, Path):  # a str passed as an override
            object.__setattr__(self, "checkpoint_dir", Path(self.checkpoint_dir))
        checks = {
            "MTL_LEARNER_BATCH_SIZE >= 1": self.batch_size >= 1,
            "MTL_LEARNER_MAX_BATCH_WAIT_S > 0": self.max_batch_wait_s > 0,
            "MTL_LEARNER_LR > 0": self.lr > 0,
            "MTL_LEARNER_EMB_LR > 0": self.embedding_lr > 0,
            "MTL_LEARNER_GRAD_CLIP >= 0": self.grad_clip >= 0,
            f"MTL_LEARNER_WEIGHTING in {WEIGHTINGS}": self.weighting in WEIGHTINGS,
            "MTL_SNAPSHOTS_KEEP >= 1": self.keep >= 1,
            "MTL_CHECKPOINTS_KEPT >= 1": self.checkpoints_kept >= 1,
            "MTL_DEDUPE_HORIZON >= 0": self.dedupe_horizon >= 0,
            f"MTL_LEARNER_DEVICE in {DEVICES}": self.device in DEVICES,
            f"MTL_LEARNER_START in {START_FROM}": self.start_from in START_FROM,
            "MTL_LEARNER_PREFETCH >= 1": self.prefetch_batches >= 1,
            "MTL_LEARNER_MAX_SAMPLES >= 0": self.max_samples >= 0,
            "MTL_LEARNER_HEALTH_TTL_S > 0": self.health_ttl_s > 0,
            "MTL_LEARNER_LOG_EVERY_S > 0": self.log_every_s > 0,
            "MTL_LEARNER_METRICS_WINDOW >= 1": self.metrics_window >= 1,
            "MTL_LEARNER_AUC_BINS >= 1": self.auc_bins >= 1,
            "MTL_LEARNER_TORCH_THREADS >= 0": self.torch_threads >= 0,
            # idle means "no record for this long": a partial batch must be flushed before
            "MTL_LEARNER_UNTIL_IDLE_S is 0 or > MTL_LEARNER_MAX_BATCH_WAIT_S": self.until_idle_s
            == 0
            or self.until_idle_s > self.max_batch_wait_s,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise SettingsError(f"invalid learner settings: {', '.join(bad)}")
        self.partition_ids()
        self.model_args()
        self.loss_config()

    def partition_ids(self) -> tuple[int, ...]:
        """Return the owned partitions as ints (empty: all)."""
        try:
            ids = tuple(int(p) for p in self.partitions)
        except ValueError as exc:
            raise SettingsError(f"MTL_LEARNER_PARTITIONS must be integers: {exc}") from exc
        if any(p < 0 for p in ids):
            raise SettingsError(f"MTL_LEARNER_PARTITIONS must be >= 0, got {ids}")
        return ids

    def model_args(self) -> dict[str, Any]:
        """Return the (partial) ModelArgs dict: the JSON overrides with ``arch`` applied."""
        args = _json_object(self.model_args_json, "MTL_LEARNER_MODEL_ARGS")
        if args.get("arch", self.arch) != self.arch:
            raise SettingsError(
                f"MTL_LEARNER_MODEL_ARGS names arch {args['arch']!r} but MTL_LEARNER_ARCH "
                f"is {self.arch!r}; set one of them"
            )
        return {**args, "arch": self.arch}

    def loss_config(self) -> LossConfig:
        """Return the loss configuration: the JSON fields plus ``weighting``."""
        fields = _json_object(self.loss_config_json, "MTL_LEARNER_LOSS_CONFIG")
        fields.setdefault("weighting", self.weighting)
        try:
            return LossConfig.from_dict(fields)
        except ValueError as exc:
            raise SettingsError(f"MTL_LEARNER_LOSS_CONFIG: {exc}") from exc

    @property
    def metrics_path(self) -> Path:
        """The metrics history file."""
        return (
            Path(self.metrics_file) if self.metrics_file else self.checkpoint_dir / "metrics.jsonl"
        )

    def public_dict(self) -> dict[str, Any]:
        """Return the settings as JSON-able values, server addresses left out (for records)."""
        hidden = {"kafka_bootstrap", "redis_url"}
        return {
            f.name: str(v) if isinstance(v := getattr(self, f.name), Path) else v
            for f in dataclasses.fields(self)
            if f.name not in hidden
        }
