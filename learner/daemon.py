"""The learner daemon: consume samples, score each batch, train on it, publish and checkpoint.

The loop reads like nanoGPT's ``train.py``: get a batch; forward, loss, backward, clip, step,
``zero_grad(set_to_none=True)``; then, on their own clocks, log, publish a snapshot, checkpoint.
Progressive validation scores each batch *before* training on it: the predictions are taken
from the training forward pass, i.e. from the weights before this batch's optimizer step (in
train mode the dense normalisation first folds in the batch's own feature statistics, never its
labels; with dropout configured the scores carry dropout noise).

Input comes from :class:`learner.source.KafkaSource`: a consumer *process* that polls and
decodes the next batches while this process trains (a thread would fight the trainer for the
GIL). The shell follows arq's worker: an injected Redis client, ``on_startup`` and
``on_shutdown`` hooks, a health key with a TTL, burst modes (``max_samples``, ``until_idle_s``)
that run the real loop to its end, and SIGTERM/SIGINT that finish the current step,
checkpoint, publish, log one summary line and return.

Crash safety: the checkpoint holds the model, optimizers, loss weights, metrics, dedupe state,
counters and the next offset of every partition, all from the same moment. After a crash the
daemon restores it and seeks there, so the samples trained after the last checkpoint are
trained again exactly once (their effect was lost with the process) and nothing is skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import orjson
import redis
import safetensors.torch
import torch
from numpy.typing import NDArray
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from torch import Tensor, nn

from feature_store.errors import PublishConflictError
from feature_store.keys import KeySpace
from feature_store.registry import SnapshotRegistry
from learner.batching import MASK_TASKS, Deduper, SampleColumns, TrainBatch, check_tasks
from learner.checkpoint import (
    Checkpoint,
    load_checkpoint,
    load_optimizer_state,
    optimizer_state,
    save_checkpoint,
)
from learner.errors import ConfigError
from learner.losses import LossResult, MultiTaskLoss
from learner.metrics import ProgressiveValidation, format_metrics
from learner.models import RankingModel, build_model
from learner.optim import clipped_params, make_optimizers
from learner.settings import LearnerSettings
from learner.source import KafkaSource, RecordBatch, SourceConfig
from mtlstream.errors import SettingsError

__all__ = [
    "Learner",
    "RunState",
    "check_health",
    "gate_stats",
    "health_key",
    "resolve_device",
]

logger = logging.getLogger(__name__)

_GET_TIMEOUT_S = 0.1  # how long the loop waits for a batch before doing its periodic work
_REDIS_TRANSIENT = (RedisConnectionError, RedisTimeoutError, PublishConflictError)

Hook = Callable[["Learner"], None]


def resolve_device(name: str) -> torch.device:
    """Return the torch device for ``auto | cpu | cuda`` (auto: CUDA when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SettingsError("MTL_LEARNER_DEVICE=cuda but torch sees no CUDA device")
    if name not in ("cpu", "cuda"):
        raise SettingsError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def health_key(settings: LearnerSettings) -> str:
    """Redis key of this learner's health line: ``{ns}health:learner-{model_name}``."""
    return KeySpace(settings.namespace).health(f"learner-{settings.model_name}")


def check_health(settings: LearnerSettings, client: redis.Redis) -> bool:
    """Return whether the learner's health key exists (it expires when the daemon stalls)."""
    try:
        raw = client.get(health_key(settings))
    except (RedisConnectionError, RedisTimeoutError) as exc:
        logger.error("health check cannot reach Redis: %s", exc)
        return False
    if raw is None:
        logger.error("learner model=%s is not healthy: no health key", settings.model_name)
        return False
    logger.info("%s", raw.decode() if isinstance(raw, bytes) else raw)
    return True


def gate_stats(model: RankingModel) -> dict[str, dict[str, list[float]]]:
    """Mean and std over the last batch of every gate's expert weights (PLE paper fig. 8)."""
    stats: dict[str, dict[str, list[float]]] = {}
    for name, weights in model.gate_weights().items():
        w = weights.float()  # (B, E)
        std = w.std(0) if w.shape[0] > 1 else torch.zeros_like(w[0])
        stats[name] = {"mean": w.mean(0).tolist(), "std": std.tolist()}
    return stats


@dataclass
class RunState:
    """Counters and offsets: what the checkpoint restores besides tensors."""

    step: int = 0  # optimizer steps
    records: int = 0  # records consumed (valid, duplicate and bad)
    samples: int = 0  # samples trained
    duplicates: int = 0  # samples dropped by the dedupe
    bad: Counter[str] = field(default_factory=Counter)  # reason -> records skipped
    offsets: dict[int, int] = field(default_factory=dict)  # partition -> next offset to read
    highwater: dict[int, int] = field(default_factory=dict)  # partition -> last known log end
    trained_through_ms: int = 0  # max emitted_at trained so far
    version: int | None = None  # last snapshot published

    @property
    def lag(self) -> int:
        """Records between the trained offsets and the last known log ends."""
        return sum(max(0, hw - self.offsets.get(p, hw)) for p, hw in self.highwater.items())

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form stored in checkpoints."""
        return {
            "step": self.step,
            "records": self.records,
            "samples": self.samples,
            "duplicates": self.duplicates,
            "bad": dict(self.bad),
            "bad_total": sum(self.bad.values()),
            "offsets": {str(p): o for p, o in sorted(self.offsets.items())},
            "trained_through_ms": self.trained_through_ms,
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunState:
        """Rebuild from `to_dict()` output."""
        return cls(
            step=int(data["step"]),
            records=int(data["records"]),
            samples=int(data["samples"]),
            duplicates=int(data["duplicates"]),
            bad=Counter({str(k): int(v) for k, v in data["bad"].items()}),
            offsets={int(p): int(o) for p, o in data["offsets"].items()},
            trained_through_ms=int(data["trained_through_ms"]),
            version=data.get("version"),
        )


@dataclass
class _Clock:
    """When something last happened, in monotonic seconds and in samples/records."""

    at: float
    samples: int = 0
    records: int = 0

    def reset(self, state: RunState) -> None:
        self.at = time.monotonic()
        self.samples = state.samples
        self.records = state.records

    def due(self, state: RunState, every_s: float, every_samples: int = 0) -> bool:
        if every_s > 0 and time.monotonic() - self.at >= every_s:
            return True
        return every_samples > 0 and state.samples - self.samples >= every_samples


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    # bf16 autocast on CUDA only: on CPU it would be slower and change the numbers
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Learner:
    """The online training daemon; `run()` is the loop, everything else a named helper."""

    def __init__(
        self,
        settings: LearnerSettings,
        redis_client: redis.Redis,
        *,
        on_startup: Hook | None = None,
        on_shutdown: Hook | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis_client
        self.on_startup = on_startup
        self.on_shutdown = on_shutdown
        self.device = resolve_device(settings.device)
        self.pin_memory = self.device.type == "cuda"
        torch.set_num_threads(settings.torch_threads or max(1, (os.cpu_count() or 2) - 1))
        torch.manual_seed(settings.seed)
        # the raw module: snapshots and checkpoints are always saved from it, never a wrapper
        self.model = build_model(settings.model_args()).to(self.device).train()
        check_tasks(self.model.tasks)
        self.loss_fn = MultiTaskLoss.for_model(self.model, settings.loss_config()).to(self.device)
        self.optimizers = self._make_optimizers()
        self.metrics = ProgressiveValidation(
            self.model.task_kinds, settings.metrics_window, settings.auc_bins
        )
        self.deduper = Deduper(settings.dedupe_horizon)
        self.registry = SnapshotRegistry(
            redis_client, settings.model_name, settings.namespace, keep=settings.keep
        )
        self.state = RunState()
        self.last_loss: LossResult | None = None  # of the last step; floats only when logged
        self.stop_requested = False
        self.source: KafkaSource | None = None
        self.first_batch_at: float | None = None  # monotonic time the first batch was trained
        self.last_batch_at: float | None = None  # ... and the last one
        self._first_records = 0  # records consumed when the first batch was trained
        now = time.monotonic()
        self._started_at = now
        self._published = _Clock(now)
        self._checkpointed = _Clock(now)
        self._logged = _Clock(now)
        self._health_at = 0.0
        self._bad_logged_at = 0.0
        self._history = settings.metrics_path

    # --- construction ---------------------------------------------------------------------

    def _make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Adam for dense parameters, SparseAdam for embedding tables (`learner.optim`)."""
        s = self.settings
        return make_optimizers(
            self.model,
            self.loss_fn.parameters(),
            lr=s.lr,
            embedding_lr=s.embedding_lr,
            sparse_embeddings=s.sparse_embeddings,
        )

    @property
    def dense_params(self) -> list[nn.Parameter]:
        """Parameters whose gradients are clipped (`learner.optim.clipped_params`)."""
        return clipped_params(self.optimizers)

    # --- the loop -------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Consume, score, train, publish and checkpoint until stopped; return the summary."""
        self.startup()
        source = self.source
        if source is None:
            raise RuntimeError("startup() did not open the source")
        try:
            while not self.stop_requested and not source.finished:
                batch = source.get(timeout=_GET_TIMEOUT_S)
                if batch is not None:
                    self.train_on(batch)
                elif self._idle_done(source):
                    logger.info("idle for %.1f s: stopping (burst mode)", source.idle_for())
                    break
                self.periodic()
        finally:
            source.stop()
            self.shutdown()
        return self.summary()

    def train_on(self, batch: RecordBatch) -> None:
        """Dedupe a decoded batch, score it, train on it, then advance offsets and counters."""
        cols = batch.columns
        keep = self.deduper.filter(cols.hashes)
        fresh = cols if keep.all() else cols.select(keep)
        if len(fresh):
            tensors = fresh.to_batch(self.pin_memory).to(self.device, self.pin_memory)
            preds = self.train_step(tensors)
            self.metrics.update(preds, _task_labels(fresh), _task_masks(fresh))
            self.state.trained_through_ms = max(
                self.state.trained_through_ms, int(fresh.emitted_at.max())
            )
        self.state.records += batch.n_records
        now = time.monotonic()
        if self.first_batch_at is None:
            self.first_batch_at, self._first_records = now, self.state.records
        self.last_batch_at = now
        self.state.samples += len(fresh)
        self.state.duplicates += len(cols) - len(fresh)
        self.state.bad.update(cols.bad)
        self.state.offsets.update(batch.end_offsets)
        self.state.highwater.update(batch.highwater)
        if cols.bad:
            self._log_bad(cols.bad)

    def train_step(self, batch: TrainBatch) -> dict[str, NDArray[np.float64]]:
        """One optimizer step; return the batch's predictions from *before* the step."""
        targets = batch.targets(self.model.tasks)
        with _autocast(self.device):
            outputs = self.model(batch.cat, batch.dense)  # task -> (B,)
            result: LossResult = self.loss_fn(outputs, targets, self.state.step)
        torch.autograd.backward(result.total)  # Tensor.backward is untyped in torch
        if self.settings.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.dense_params, self.settings.grad_clip)
        for optimizer in self.optimizers.values():
            optimizer.step()
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.last_loss = dataclasses.replace(result, total=result.total.detach())
        with torch.no_grad():
            preds = self.model.to_predictions({t: o.float() for t, o in outputs.items()})
        return {t: p.detach().to("cpu", torch.float64).numpy() for t, p in preds.items()}

    def periodic(self) -> None:
        """Log, record health, publish and checkpoint when each one's period has passed."""
        s = self.settings
        if self._logged.due(self.state, s.log_every_s):
            self.log_status()
        if time.monotonic() - self._health_at >= min(s.log_every_s, s.health_ttl_s / 3):
            self.record_health()
        if self.state.samples > self._published.samples and self._published.due(
            self.state, s.publish_every_s, s.publish_every_samples
        ):
            self.publish()
        if self.state.records > self._checkpointed.records and self._checkpointed.due(
            self.state, s.checkpoint_every_s, s.checkpoint_every_samples
        ):
            self.checkpoint()

    def _idle_done(self, source: KafkaSource) -> bool:
        until = self.settings.until_idle_s
        return until > 0 and source.idle_for() >= until

    # --- startup and shutdown -------------------------------------------------------------

    def startup(self) -> None:
        """Restore the checkpoint, then start the consumer process at the restored offsets."""
        ckpt = load_checkpoint(self.settings.checkpoint_dir)
        if ckpt is not None:
            self.restore(ckpt)
        s = self.settings
        config = SourceConfig(
            bootstrap=s.kafka_bootstrap,
            group_id=s.group_id,
            topic=s.samples_topic,
            spec=self.model.args.features,
            batch_size=s.batch_size,
            max_wait_s=s.max_batch_wait_s,
            owned=s.partition_ids(),
            start=dict(self.state.offsets),
            start_from=s.start_from,
            max_records=s.max_samples,
            log_level=logging.getLogger().getEffectiveLevel(),
        )
        if self.on_startup is not None:
            self.on_startup(self)
        self.source = KafkaSource(config, prefetch=s.prefetch_batches)
        try:
            owned = self.source.start()
        except Exception:
            self.source.close()
            raise
        now = time.monotonic()
        self._started_at = now
        for clock in (self._published, self._checkpointed, self._logged):
            clock.reset(self.state)
        logger.info(
            "learner started model=%s arch=%s topic=%s partitions=%s device=%s step=%d "
            "samples=%d resumed=%s",
            s.model_name,
            self.model.args.arch,
            s.samples_topic,
            owned,
            self.device,
            self.state.step,
            self.state.samples,
            ckpt is not None,
        )

    def shutdown(self) -> None:
        """Checkpoint, publish what is new, commit offsets, clear health, log a summary."""
        if self.state.samples > self._published.samples:
            self.publish()
        self.checkpoint()
        self.write_history()
        if self.source is not None:
            self.source.commit(self.state.offsets)
            self.source.close()
        with contextlib.suppress(RedisConnectionError, RedisTimeoutError):
            self.redis.delete(health_key(self.settings))
        if self.on_shutdown is not None:
            self.on_shutdown(self)
        logger.info("learner stopped %s", _kv(self.summary()))

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT finish the current step, then stop the loop cleanly."""

        def handle(signum: int, frame: FrameType | None) -> None:
            logger.info("received %s: finishing the current step", signal.Signals(signum).name)
            self.stop_requested = True

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    # --- snapshots, checkpoints, health ---------------------------------------------------

    def snapshot_meta(self) -> dict[str, Any]:
        """Metadata published with a snapshot (all JSON; the registry adds sha256 etc.)."""
        return {
            "model_args": self.model.model_args,
            "feature_spec": self.model.args.features.to_dict(),
            "step": self.state.step,
            "metrics": self.metrics.get(),
            "offsets": {self.settings.samples_topic: self.state.to_dict()["offsets"]},
            "samples_seen": self.state.samples,
            "records": self.state.records,
            "trained_through_ms": self.state.trained_through_ms,
            "loss_config": self.loss_fn.config.to_dict(),
            "gates": gate_stats(self.model),
        }

    def publish(self) -> int | None:
        """Publish a snapshot of the raw module; a Redis outage is logged and retried later."""
        weights = safetensors.torch.save(_cpu_state(self.model))
        try:
            version = self.registry.publish(weights, self.snapshot_meta())
        except _REDIS_TRANSIENT as exc:
            logger.warning("snapshot publish failed, retrying next period: %s", exc)
            self._published.at = time.monotonic()
            return None
        self.state.version = version
        self._published.reset(self.state)
        return version

    def checkpoint_tensors(self) -> dict[str, Tensor]:
        """Every tensor the checkpoint holds, by prefixed name."""
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"loss.{k}": v for k, v in self.loss_fn.state_dict().items()})
        for name, optimizer in self.optimizers.items():
            tensors.update(optimizer_state(optimizer, f"optim.{name}")[0])
        for key, value in self.metrics.state_dict().items():
            tensors[f"metrics.{key}"] = torch.from_numpy(value)
        hashes, _ = self.deduper.state()
        tensors["dedupe.hashes"] = torch.from_numpy(hashes.view(np.int64))
        return tensors

    def checkpoint_meta(self) -> dict[str, Any]:
        """The checkpoint's JSON part."""
        return {
            **self.state.to_dict(),
            "topic": self.settings.samples_topic,
            "model_args": self.model.model_args,
            "loss_config": self.loss_fn.config.to_dict(),
            "optimizers": {
                name: optimizer_state(opt, f"optim.{name}")[1]
                for name, opt in self.optimizers.items()
            },
            "dedupe": {**self.deduper.state()[1], "horizon": self.deduper.horizon},
            "metrics": self.metrics.get(),
            "settings": self.settings.public_dict(),
        }

    def checkpoint(self) -> Path:
        """Save a checkpoint and ask the source to commit its offsets to the group."""
        path = save_checkpoint(
            self.settings.checkpoint_dir,
            self.checkpoint_tensors(),
            self.checkpoint_meta(),
            keep=self.settings.checkpoints_kept,
        )
        self._checkpointed.reset(self.state)
        if self.source is not None and self.state.offsets:
            self.source.request_commit(self.state.offsets)
        logger.info(
            "checkpoint step=%d samples=%d records=%d path=%s",
            self.state.step,
            self.state.samples,
            self.state.records,
            path,
        )
        return path

    def restore(self, ckpt: Checkpoint) -> None:
        """Load a checkpoint after checking that it fits these settings."""
        meta = ckpt.meta
        self._check_compatible(ckpt)
        t = ckpt.tensors
        self.model.load_state_dict(_strip(t, "model."), strict=True)
        self.loss_fn.load_state_dict(_strip(t, "loss."), strict=True)
        for name, optimizer in self.optimizers.items():
            load_optimizer_state(optimizer, t, f"optim.{name}", meta["optimizers"][name])
        self.metrics.load_state_dict({k: v.numpy() for k, v in _strip(t, "metrics.").items()})
        hashes = t["dedupe.hashes"].numpy().view(np.uint64)
        self.deduper.load_state(hashes, meta["dedupe"])
        self.state = RunState.from_dict(meta)
        logger.info(
            "restored checkpoint path=%s step=%d samples=%d",
            ckpt.path,
            self.state.step,
            self.state.samples,
        )

    def _check_compatible(self, ckpt: Checkpoint) -> None:
        meta = ckpt.meta
        pairs = {
            "model_args": (meta.get("model_args"), self.model.model_args),
            "loss_config": (meta.get("loss_config"), self.loss_fn.config.to_dict()),
            "topic": (meta.get("topic"), self.settings.samples_topic),
            "optimizers": (sorted(meta.get("optimizers", {})), sorted(self.optimizers)),
        }
        for what, (stored, wanted) in pairs.items():
            if stored != wanted:
                raise ConfigError(
                    f"checkpoint {ckpt.path} was written with {what}={stored!r}, but the settings "
                    f"ask for {what}={wanted!r}; match the settings or use another "
                    "MTL_CHECKPOINT_DIR"
                )

    def record_health(self) -> None:
        """Write the one-line status under the health key, with a TTL."""
        self._health_at = time.monotonic()
        line = _kv({"status": "running", **self.status_fields()})
        try:
            self.redis.set(
                health_key(self.settings), line, px=int(self.settings.health_ttl_s * 1000)
            )
        except (RedisConnectionError, RedisTimeoutError) as exc:
            logger.warning("health key not written: %s", exc)

    # --- observability --------------------------------------------------------------------

    def status_fields(self) -> dict[str, Any]:
        """Counters for the status line, the health key and the summary."""
        s = self.state
        return {
            "step": s.step,
            "records": s.records,
            "samples": s.samples,
            "duplicates": s.duplicates,
            "bad": sum(s.bad.values()),
            "lag": s.lag,
            "version": s.version,
            "trained_through_ms": s.trained_through_ms,
        }

    def log_status(self) -> None:
        """Log one key=value status line and append a record to the metrics history."""
        elapsed = max(time.monotonic() - self._logged.at, 1e-9)
        rate = (self.state.records - self._logged.records) / elapsed
        logger.info(
            "%s samples_per_s=%.0f %s",
            _kv(self.status_fields()),
            rate,
            format_metrics(self.metrics.get(), ("auc_w", "logloss_w", "mse_w")),
        )
        self.write_history(rate)
        self._logged.reset(self.state)

    def write_history(self, samples_per_s: float | None = None) -> None:
        """Append one JSON line (metrics, counters, gate statistics) to the history file."""
        record = {
            "ts": int(time.time() * 1000),
            **self.status_fields(),
            "samples_per_s": samples_per_s,
            "loss": None if self.last_loss is None else self.last_loss.as_floats(),
            "metrics": self.metrics.get(),
            "gates": gate_stats(self.model),
        }
        self._history.parent.mkdir(parents=True, exist_ok=True)
        with open(self._history, "ab") as f:
            f.write(orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")

    def summary(self) -> dict[str, Any]:
        """The run's outcome: counters, offsets, elapsed time and metrics."""
        elapsed = time.monotonic() - self._started_at
        first, last = self.first_batch_at, self.last_batch_at
        steady = last - first if first is not None and last is not None else 0.0
        return {
            **self.status_fields(),
            "elapsed_s": round(elapsed, 3),
            # records/s from the end of the first trained batch to the end of the last one:
            # the loop's rate without start-up (imports, connections) and shutdown work
            "records_per_s": round((self.state.records - self._first_records) / steady, 1)
            if steady > 0
            else None,
            "offsets": self.state.to_dict()["offsets"],
            "checksum": self.deduper.checksum,
        }

    def _log_bad(self, bad: Counter[str]) -> None:
        # rate-limited: one line per log period at most, counts are in every status line
        now = time.monotonic()
        if now - self._bad_logged_at >= self.settings.log_every_s:
            self._bad_logged_at = now
            logger.warning(
                "skipped bad samples %s (total %d)", dict(bad), sum(self.state.bad.values())
            )

    @torch.no_grad()
    def predict(self, cat: Tensor, dense: Tensor) -> dict[str, Tensor]:
        """Predictions of the current weights in eval mode (what a snapshot reader computes)."""
        self.model.eval()
        try:
            return self.model.predict(cat.to(self.device), dense.to(self.device))
        finally:
            self.model.train()


def _task_labels(cols: SampleColumns) -> dict[str, NDArray[np.float32]]:
    click, conversion, ysl = cols.labels.T  # 3 x (N,)
    return {"ctr": click, "cvr": conversion, "ctcvr": click * conversion, "ysl": ysl}


def _task_masks(cols: SampleColumns) -> dict[str, NDArray[np.float32]]:
    return {task: cols.masks[:, j] for j, task in enumerate(MASK_TASKS)}


def _cpu_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def _strip(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _kv(fields: Mapping[str, Any]) -> str:
    def text(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        if isinstance(value, dict):
            return orjson.dumps(value).decode()
        return str(value)

    return " ".join(f"{k}={text(v)}" for k, v in fields.items())
