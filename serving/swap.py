"""Hot model swap: follow the registry, verify and build snapshots off the loop, swap atomically.

The served model is one reference, :attr:`ModelHolder.current`. A request reads it once and uses
that object for everything (fields to read, runtime, version in the answer), so a response can
never mix two versions, and a swap is one assignment on the event loop. Building (safetensors ->
torch -> ONNX session) runs in a worker thread, never on the request path.

A snapshot that fails its sha256 check, does not load, or does not fit this scorer's settings is
refused: one WARNING line and ``mtl_serve_snapshots_rejected{reason}``; the previous model serves
on. A Redis error while fetching is transient: the watcher follows ``latest`` again after a poll
interval, so that version is retried, not lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import safetensors.torch
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from feature_store.errors import CorruptSnapshotError, SnapshotNotFoundError
from feature_store.registry import AsyncSnapshotRegistry, Snapshot
from learner.errors import ConfigError
from learner.models import RankingModel, load_model
from serving.errors import IncompatibleSnapshotError
from serving.metrics import ServingMetrics
from serving.runtime import OnnxExporter, OnnxUnavailableError, TorchRuntime, onnx_available
from serving.scorer import LoadedModel, Runtime, check_fusion, read_fields_for

__all__ = ["ModelBuilder", "ModelHolder", "SnapshotWatcher", "rebuild_model"]

logger = logging.getLogger(__name__)

_TRANSIENT = (RedisConnectionError, RedisTimeoutError)


class ModelHolder:
    """The one reference to the served model: requests read it once, swaps replace it.

    It also remembers when each of the last ``history`` models started serving (``swaps``):
    end-to-end freshness needs the moment a snapshot went live, not only when it was published.
    """

    def __init__(
        self,
        model: LoadedModel | None = None,
        history: int = 256,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.current = model
        self.clock = clock
        # oldest first: {"version", "loaded_at" (epoch ms), "created_at", "trained_through_ms"}
        self.swaps: deque[dict[str, int | None]] = deque(maxlen=history)
        if model is not None:
            self._remember(model)

    def swap(self, model: LoadedModel) -> LoadedModel | None:
        """Serve ``model`` from now on; return the one it replaces."""
        previous, self.current = self.current, model
        self._remember(model)
        return previous

    def _remember(self, model: LoadedModel) -> None:
        trained = model.meta.get("trained_through_ms")
        self.swaps.append(
            {
                "version": model.version,
                "loaded_at": int(self.clock() * 1000),
                "created_at": model.created_at_ms,
                "trained_through_ms": trained if isinstance(trained, int) else None,
            }
        )

    @property
    def loaded_at_ms(self) -> int | None:
        """When the current model started serving (epoch ms), None before the first."""
        return self.swaps[-1]["loaded_at"] if self.swaps and self.current is not None else None


def rebuild_model(snapshot: Snapshot) -> RankingModel:
    """Rebuild a snapshot's model (eval mode) from its ``model_args`` and safetensors weights."""
    model_args = snapshot.meta.get("model_args")
    if not isinstance(model_args, Mapping):
        raise IncompatibleSnapshotError(
            f"snapshot version {snapshot.version} has no model_args object in its metadata"
        )
    state = safetensors.torch.load(snapshot.weights)
    return load_model(model_args, state)


@dataclass
class ModelBuilder:
    """Turns a verified snapshot into a :class:`LoadedModel` (called in a worker thread)."""

    # "auto" (ONNX when installed), "onnx" (torch only if the export fails) or "torch"
    runtime: str = "auto"
    # fusion weights, checked against each snapshot's tasks before it may serve
    weights: Mapping[str, float] = field(default_factory=dict)
    # feature fields read beyond the spec (MTL_SERVE_EXTRA_FEATURES)
    extra_fields: tuple[str, ...] = ()
    # intra-op threads of ONNX Runtime sessions
    threads: int = 1
    metrics: ServingMetrics | None = None
    _exporter: OnnxExporter | None = field(default=None, init=False, repr=False)

    def _use_onnx(self) -> bool:
        if self.runtime == "torch":
            return False
        return self.runtime == "onnx" or onnx_available()

    def _runtime(self, model: RankingModel, version: int) -> Runtime:
        if not self._use_onnx():
            return TorchRuntime(model)
        try:
            if self._exporter is None:
                self._exporter = OnnxExporter(self.threads)
            return self._exporter.runtime(model)
        except OnnxUnavailableError as exc:
            logger.warning("version=%d served by torch: %s", version, exc)
            if self.metrics is not None:
                self.metrics.onnx_fallbacks.inc()
            return TorchRuntime(model)

    def build(self, snapshot: Snapshot) -> LoadedModel:
        """Rebuild, check against the fusion weights, pick the runtime; raise if unservable."""
        model = rebuild_model(snapshot)
        check_fusion(self.weights, model.task_kinds)
        spec = model.args.features
        return LoadedModel(
            version=snapshot.version,
            tasks=model.tasks,
            task_kinds=dict(model.task_kinds),
            spec=spec,
            runtime=self._runtime(model, snapshot.version),
            fields=read_fields_for(spec, self.extra_fields),
            meta={k: v for k, v in snapshot.meta.items() if k != "offsets"},
        )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, CorruptSnapshotError):
        return "corrupt"
    if isinstance(exc, IncompatibleSnapshotError | ConfigError):
        return "incompatible"
    return "unloadable"


class SnapshotWatcher:
    """Follows the registry (pub/sub, polling as fallback) and swaps each new snapshot in."""

    def __init__(
        self,
        registry: AsyncSnapshotRegistry,
        holder: ModelHolder,
        builder: ModelBuilder,
        metrics: ServingMetrics,
        poll_interval_s: float = 5.0,
    ) -> None:
        self.registry = registry
        self.holder = holder
        self.builder = builder
        self.metrics = metrics
        self.poll_interval_s = poll_interval_s

    async def run(self) -> None:
        """Follow ``latest`` forever (cancel to stop)."""
        while True:
            await self._follow()
            # a transient failure: after a pause, follow again (re-reads and re-yields latest)
            await asyncio.sleep(self.poll_interval_s)

    async def _follow(self) -> None:
        updates = self.registry.updates(self.poll_interval_s)
        async with contextlib.aclosing(updates) as versions:
            async for version in versions:
                current = self.holder.current
                if current is not None and current.version == version:
                    continue
                if not await self.apply(version):
                    return

    async def apply(self, version: int) -> bool:
        """Fetch, verify, build off the loop and swap one version.

        Returns False only when Redis failed while fetching (worth retrying); a refused snapshot
        returns True, since retrying it cannot help.
        """
        started = time.perf_counter()
        try:
            snapshot = await self.registry.load(version)
        except SnapshotNotFoundError as exc:  # pruned or rolled over meanwhile: a newer one comes
            logger.info("skipped model=%s version=%d: %s", self.registry.name, version, exc)
            return True
        except CorruptSnapshotError as exc:
            self._refuse(version, exc)
            return True
        except _TRANSIENT as exc:
            logger.warning("fetching version=%d failed, retrying later: %s", version, exc)
            return False
        try:
            model = await asyncio.to_thread(self.builder.build, snapshot)
        except Exception as exc:  # an untrusted snapshot: whatever fails, the old model serves on
            self._refuse(version, exc)
            return True
        self._swap(model, time.perf_counter() - started)
        return True

    def _refuse(self, version: int, exc: BaseException) -> None:
        reason = _reason(exc)
        self.metrics.rejected.labels(reason).inc()
        current = self.holder.current
        logger.warning(
            "refused model=%s version=%d reason=%s serving=%s: %s",
            self.registry.name,
            version,
            reason,
            current.version if current is not None else None,
            exc,
        )

    def _swap(self, model: LoadedModel, seconds: float) -> None:
        previous = self.holder.swap(model)
        self.metrics.swaps.inc()
        self.metrics.set_model(model.version, model.created_at_ms)
        logger.info(
            "swapped model=%s version=%d previous=%s runtime=%s build_s=%.2f",
            self.registry.name,
            model.version,
            previous.version if previous is not None else None,
            model.runtime.name,
            seconds,
        )
