"""One demo run from start to summary.

1. Kafka and Redis: the ones named by ``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL``, else the local
   ones (``mtlstream services up``, left running afterwards).
2. The run's topics (``stream.topics.ensure_topics``) and the simulated world's user and item
   features in Redis, so the scorer sees real features from the first request.
3. Four children, each ``python -m mtlstream <verb>`` with its own environment and log file:
   the stream worker, the learner, the scorer and the simulator, whose ranker is the scorer
   (the closed loop, :mod:`demo.loop`).
4. Until ``duration_s`` has passed: the live view (or a status line), a child that ends is
   reported (name, exit code, tail of its log) and stops the run with exit code 3; SIGINT /
   SIGTERM stop it with 130 / 143.
5. Every child stopped (:class:`demo.supervisor.Supervisor`), then the summary (printed and in
   ``summary.json``) and the plots, and the run's topics and Redis keys deleted unless kept.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

import numpy as np
import orjson
import redis

from demo.loop import load_world_features
from demo.metrics import freshness_ms, histogram_quantile, quantiles
from demo.monitor import ORACLE_TASKS, TOPIC_KINDS, JsonlTail, Monitor, Reading
from demo.quality import QualityReport, evaluate, frozen_model
from demo.report import format_summary, write_plots
from demo.settings import DemoSettings
from demo.supervisor import ChildSpec, Supervisor
from demo.view import build_view, render, status_line
from feature_store.errors import FeatureStoreError
from feature_store.registry import Snapshot, SnapshotRegistry
from feature_store.store import FeatureStore
from learner.features import default_feature_spec
from mtlstream import services
from mtlstream.settings import from_env
from serving.settings import ServingSettings
from stream.settings import StreamSettings
from stream.world import World, WorldConfig

__all__ = [
    "EXIT_CHILD_DIED",
    "DemoRun",
    "RunFiles",
    "child_specs",
    "demo_model_args",
    "topic_names",
]

logger = logging.getLogger(__name__)

#: Exit code of a run stopped because a child ended on its own.
EXIT_CHILD_DIED = 3
#: SIGTERM goes to the traffic first, the learner last (it publishes a final snapshot).
STOP_ORDER = ("simulate", "serve", "stream", "learn")
_EXIT_FOR_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}
_RATE_SPAN_S = 2.0  # rates in the view are over about this many seconds
_SERIES_EVERY_S = 1.0  # one point of the AUC-over-time plot per this many seconds


@dataclass(frozen=True)
class RunFiles:
    """Where a run writes: logs, served log, truth, learner files, summary, plots."""

    out: Path

    @property
    def logs(self) -> Path:
        """One log file per child, plus the demo's own."""
        return self.out / "logs"

    @property
    def served_log(self) -> Path:
        """The closed loop's served requests (JSONL)."""
        return self.out / "served.jsonl"

    @property
    def truth(self) -> Path:
        """The simulator's true probabilities per impression (JSONL)."""
        return self.out / "truth.jsonl"

    @property
    def learner_history(self) -> Path:
        """The learner's metrics history (JSONL)."""
        return self.out / "learner-metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        """The learner's checkpoint directory."""
        return self.out / "learner"

    @property
    def stream_data(self) -> Path:
        """The stream worker's faust data directory."""
        return self.out / "stream"

    @property
    def summary(self) -> Path:
        """The summary as JSON."""
        return self.out / "summary.json"

    @property
    def plots(self) -> Path:
        """The PNG plots."""
        return self.out / "plots"


def topic_names(settings: DemoSettings) -> dict[str, str]:
    """The run's topic per kind (the five topics of DESIGN.md section 2)."""
    return {kind: settings.topic(kind) for kind in TOPIC_KINDS}


def demo_model_args() -> str:
    """The learner's default model without ``item_ctr_1h`` (JSON for MTL_LEARNER_MODEL_ARGS).

    The simulator's impressions carry the world's own raw one-hour CTR, while the scorer reads
    the stream's smoothed counter from Redis: the same name, two different values. Trained on
    one and served the other, the model ranks worse than without the feature, so the demo
    leaves it out (set MTL_LEARNER_MODEL_ARGS to choose otherwise).

    Examples
    --------
    >>> orjson.loads(demo_model_args())["features"]["dense"]
    ['user_activity', 'item_price', 'item_age_h']
    """
    spec = default_feature_spec().to_dict()
    spec["dense"] = [name for name in spec["dense"] if name != "item_ctr_1h"]
    return orjson.dumps({"features": spec}).decode()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _common_env(
    settings: DemoSettings, base: Mapping[str, str], kafka: str, redis_url: str
) -> dict[str, str]:
    topics = topic_names(settings)
    return {
        **base,
        "PYTHONUNBUFFERED": "1",
        "MTL_DEMO_RUN_ID": settings.run_id,  # also marks every process of the run
        "KAFKA_BOOTSTRAP_SERVERS": kafka,
        "REDIS_URL": redis_url,
        "MTL_NAMESPACE": settings.redis_namespace,
        "MTL_TOPIC_PARTITIONS": str(settings.partitions),
        "MTL_IMPRESSIONS_TOPIC": topics["impressions"],
        "MTL_CLICKS_TOPIC": topics["clicks"],
        "MTL_FOLLOW_CLICKS_TOPIC": topics["follow_clicks"],
        "MTL_SAMPLES_TOPIC": topics["samples"],
        "MTL_DEAD_LETTERS_TOPIC": topics["dead_letters"],
    }


def child_specs(
    settings: DemoSettings,
    files: RunFiles,
    kafka: str,
    redis_url: str,
    scorer_port: int,
    base_env: Mapping[str, str],
) -> list[ChildSpec]:
    """The four children of a run, in start order: stream, learn, serve, simulate."""
    common = _common_env(settings, base_env, kafka, redis_url)
    window_ms = str(int(settings.window_s * 1000))
    stream = {
        "MTL_STREAM_APP_ID": settings.prefix,
        "MTL_STREAM_DATA_DIR": str(files.stream_data),
        "MTL_MAX_FUTURE_SKEW_MS": "-1",  # the simulated clock runs ahead of the wall
        "MTL_CLICK_WINDOW_MS": window_ms,
        "MTL_FOLLOW_WINDOW_MS": window_ms,
        "MTL_ALLOWED_LATENESS_MS": str(int(min(60.0, settings.window_s / 10) * 1000)),
        "MTL_IDLE_TIMEOUT_MS": "1500",
        "MTL_TICK_INTERVAL_S": "0.5",
        "MTL_COUNTERS": "true" if settings.counters else "false",
    }
    learn = {
        "MTL_LEARNER_MODEL_ARGS": base_env.get("MTL_LEARNER_MODEL_ARGS") or demo_model_args(),
        "MTL_LEARNER_GROUP": f"{settings.prefix}-learner",
        "MTL_CHECKPOINT_DIR": str(files.checkpoints),
        "MTL_LEARNER_METRICS_FILE": str(files.learner_history),
        "MTL_PUBLISH_EVERY_S": f"{settings.publish_every_s:g}",
        "MTL_LEARNER_LOG_EVERY_S": "2",
        "MTL_LEARNER_METRICS_WINDOW": str(settings.metrics_window),
        "MTL_LEARNER_TORCH_THREADS": base_env.get("MTL_LEARNER_TORCH_THREADS", "1"),
    }
    serve = {
        "MTL_SERVE_HOST": "127.0.0.1",
        "MTL_SERVE_PORT": str(scorer_port),
        "MTL_SERVE_RUNTIME": settings.scorer_runtime,
        "MTL_SERVE_POLL_S": "1",
    }
    simulate_args = (
        "--seed",
        str(settings.seed),
        "--speedup",
        f"{settings.speedup:g}",
        "--rate",
        f"{settings.rate:g}",
        "--pacing",
        "sim",
        "--bootstrap",
        kafka,
        "--world",
        orjson.dumps(settings.world_config()).decode(),
        "--scorer",
        f"http://127.0.0.1:{scorer_port}",
        "--served-log",
        str(files.served_log),
        "--truth-file",
        str(files.truth),
        "--write-item-features",
    )

    def spec(verb: str, env: Mapping[str, str], *args: str) -> ChildSpec:
        argv = (sys.executable, "-m", "mtlstream", verb, *args)
        return ChildSpec(verb, argv, {**common, **env}, files.logs / f"{verb}.log")

    return [
        spec("stream", stream),
        spec("learn", learn),
        spec("serve", serve),
        spec("simulate", {}, *simulate_args),
    ]


class _StopNowError(Exception):
    """A second SIGINT / SIGTERM: give up on the summary, just stop the children."""


@contextlib.contextmanager
def _stderr_quiet(enabled: bool) -> Iterator[None]:
    """While the live view draws, keep INFO lines off the terminal (they stay in demo.log)."""
    handlers = [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]
    levels = [h.level for h in handlers]
    if enabled:
        for h in handlers:
            h.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for h, level in zip(handlers, levels, strict=True):
            h.setLevel(level)


class DemoRun:
    """One run of the demo: ``run()`` returns the exit code."""

    def __init__(
        self,
        settings: DemoSettings,
        env: Mapping[str, str] | None = None,
        out: IO[str] | None = None,
    ) -> None:
        self.settings = settings
        self.env = dict(os.environ if env is None else env)
        self.out = sys.stdout if out is None else out
        self.files = RunFiles(settings.out_path)
        self.kafka = settings.kafka_bootstrap
        self.redis_url = settings.redis_url
        self.stop_signal: signal.Signals | None = None
        self.stopped_by = ""
        self.readings: deque[Reading] = deque()
        self.series: list[dict[str, Any]] = []
        self.frozen: Snapshot | None = None
        self.last_scorer_buckets: list[tuple[float, float]] = []
        self.started_wall_ms = int(time.time() * 1000)
        self.view = settings.view and self.out.isatty()
        self.serving = from_env(ServingSettings, self.env)

    # --- setup ------------------------------------------------------------------------------

    def _services(self) -> None:
        """Use the servers named in the settings, else start (or find) the local ones."""
        if self.kafka and self.redis_url:
            return
        local = from_env(services.ServicesSettings, self.env)
        local.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.redis_url:
            logger.info("%s", services.start_redis(local).line())
            self.redis_url = local.redis_url
        if not self.kafka:
            logger.info("%s", services.start_kafka(local).line())
            self.kafka = local.kafka_bootstrap

    def _topics(self) -> None:
        from stream.topics import ensure_topics

        topics = topic_names(self.settings)
        ensure_topics(
            StreamSettings(
                kafka_bootstrap=self.kafka,
                app_id=self.settings.prefix,
                partitions=self.settings.partitions,
                impressions_topic=topics["impressions"],
                clicks_topic=topics["clicks"],
                follow_clicks_topic=topics["follow_clicks"],
                samples_topic=topics["samples"],
                dead_letters_topic=topics["dead_letters"],
            )
        )

    def _features(self, client: redis.Redis) -> None:
        world = World(WorldConfig(**self.settings.world_config()))
        users, items = load_world_features(
            FeatureStore(client, self.settings.redis_namespace), world
        )
        logger.info("features loaded users=%d items=%d", users, items)

    # --- the loop ---------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.stop_signal is not None:
            raise _StopNowError(signal.Signals(signum).name)
        self.stop_signal = signal.Signals(signum)

    def _record(self, reading: Reading) -> None:
        self.readings.append(reading)
        while len(self.readings) > 2 and reading.t - self.readings[1].t >= _RATE_SPAN_S:
            self.readings.popleft()
        if reading.scorer is not None:
            self.last_scorer_buckets = reading.scorer.buckets
        if self.series and reading.t - self.series[-1]["t"] < _SERIES_EVERY_S:
            return
        model = (reading.learner or {}).get("metrics") or {}
        self.series.append(
            {
                "t": reading.t,
                "model": {t: model.get(f"{t}.auc_w") for t in ORACLE_TASKS},
                "oracle": {t: reading.oracle.get(f"{t}.auc_w") for t in ORACLE_TASKS},
                "served": {"auc": reading.served_auc},
                "version": None if reading.scorer is None else reading.scorer.version,
            }
        )

    def _show(self, reading: Reading, children: Mapping[str, str], last_status: float) -> float:
        before = self.readings[0] if len(self.readings) > 1 else None
        view = build_view(reading, before, self.settings.duration_s, children)
        if self.view:
            self.out.write(render(view, f"mtlstream demo  run {self.settings.run_id}"))
            self.out.flush()
            return last_status
        if reading.t - last_status >= self.settings.status_every_s:
            logger.info("demo %s", status_line(view))
            return reading.t
        return last_status

    def _grab_frozen(self, monitor: Monitor, registry: SnapshotRegistry) -> None:
        """Keep the first served snapshot (the frozen baseline) before the registry prunes it."""
        if self.frozen is not None or not monitor.swaps.versions:
            return
        for version in sorted(monitor.swaps.versions):
            try:
                self.frozen = registry.load(version)
                logger.info("frozen baseline: snapshot version %d", version)
                return
            except FeatureStoreError as exc:  # pruned already: the next one will do
                logger.info("snapshot %d not kept for the frozen baseline: %s", version, exc)

    def _loop(self, supervisor: Supervisor, monitor: Monitor, registry: SnapshotRegistry) -> int:
        deadline = time.monotonic() + self.settings.duration_s
        last_status = -math.inf
        while True:
            if self.stop_signal is not None:
                self.stopped_by = self.stop_signal.name
                return _EXIT_FOR_SIGNAL.get(self.stop_signal, 1)
            ended = supervisor.poll()
            if ended:
                for child in ended:
                    logger.error(
                        "%s exited with code %d; the last lines of its log:\n%s",
                        child.name,
                        child.code,
                        child.tail,
                    )
                self.stopped_by = "child " + ", ".join(f"{c.name} (exit {c.code})" for c in ended)
                return EXIT_CHILD_DIED
            if time.monotonic() >= deadline:
                self.stopped_by = "duration"
                return 0
            tick = time.monotonic()
            reading = monitor.poll()
            self._record(reading)
            last_status = self._show(reading, supervisor.states(), last_status)
            self._grab_frozen(monitor, registry)
            time.sleep(max(0.0, self.settings.refresh_s - (time.monotonic() - tick)))

    # --- the end ----------------------------------------------------------------------------

    def _summary(
        self, monitor: Monitor, codes: Mapping[str, int], client: redis.Redis, exit_code: int
    ) -> dict[str, Any]:
        started = time.monotonic()
        reading = monitor.poll()
        logger.info("summary: last reading in %.1f s", time.monotonic() - started)
        fresh = freshness_ms(monitor.oracle.emitted_ms, monitor.swaps.all()) / 1000.0
        median, p95, worst = quantiles(fresh)
        learner = monitor.learner or {}
        served_records = JsonlTail(self.files.served_log).read()
        started = time.monotonic()
        quality = self._quality(served_records, client)
        logger.info("summary: ranking quality in %.1f s", time.monotonic() - started)
        started = time.monotonic()
        emitted_s = (
            np.asarray(monitor.oracle.emitted_ms, dtype=np.float64) - self.started_wall_ms
        ) / 1000
        plots = write_plots(
            self.files.plots,
            self.series,
            monitor.history,
            emitted_s,
            fresh,
            self.settings.publish_every_s,
        )
        logger.info("summary: %d plots in %.1f s", len(plots), time.monotonic() - started)
        view = build_view(reading, None, self.settings.duration_s, {})
        return {
            "run_id": self.settings.run_id,
            "out": str(self.files.out),
            "wall_s": reading.t,
            "stopped_by": self.stopped_by,
            "exit_code": exit_code,
            "children": dict(codes),
            "topics": dict(reading.offsets),
            "learner": {k: learner.get(k) for k in ("samples", "step", "version", "lag")},
            "metrics": [
                {"task": r.task, "metric": r.metric, "model": r.model, "oracle": r.oracle}
                for r in view.metrics
            ],
            "oracle_samples": reading.oracle_samples,
            "scorer": {
                "versions": monitor.swaps.versions,
                "latency_p50_ms": 1000 * histogram_quantile(0.5, self.last_scorer_buckets),
                "latency_p99_ms": 1000 * histogram_quantile(0.99, self.last_scorer_buckets),
            },
            "served": {
                "requests": monitor.served.requests,
                "fallbacks": dict(monitor.served.fallbacks),
                "by_version": {str(v): n for v, n in sorted(monitor.served.by_version.items())},
            },
            "quality": quality.to_dict(),
            "freshness": {
                "n": int(np.isfinite(fresh).sum()),
                "pending": int((~np.isfinite(fresh)).sum()),
                "median_s": median,
                "p95_s": p95,
                "max_s": worst,
                "publish_every_s": self.settings.publish_every_s,
            },
            "plots": [str(p) for p in plots],
        }

    def _quality(self, records: list[dict[str, Any]], client: redis.Redis) -> QualityReport:
        store = FeatureStore(client, self.settings.redis_namespace)
        frozen = None
        if self.frozen is not None:
            frozen = frozen_model(self.frozen, self.serving.fusion)
        return evaluate(records, frozen, store, self.serving.fusion, seed=self.settings.seed)

    def _cleanup(self, client: redis.Redis) -> None:
        """Delete the run's topics and (per-run namespace only) Redis keys."""
        if self.settings.keep_data:
            return
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=self.kafka, client_id="mtl-demo-cleanup")
        try:
            mine = [t for t in admin.list_topics() if t.startswith(self.settings.prefix)]
            if mine:
                admin.delete_topics(mine)
        finally:
            admin.close()
        if self.settings.namespace:  # a namespace the user named may hold more than this run
            return
        keys = list(client.scan_iter(match=f"{self.settings.redis_namespace}*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])

    # --- entry point ------------------------------------------------------------------------

    def run(self) -> int:
        """Run the demo; return the exit code (0, 3 child died, 130 SIGINT, 143 SIGTERM)."""
        self.files.logs.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.files.logs / "demo.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        previous = {s: signal.signal(s, self._on_signal) for s in _EXIT_FOR_SIGNAL}
        try:
            return self._run()
        except _StopNowError:
            logger.warning("stopped without a summary")
            return _EXIT_FOR_SIGNAL.get(self.stop_signal or signal.SIGINT, 1)
        finally:
            for signum, old in previous.items():
                signal.signal(signum, old)
            logging.getLogger().removeHandler(handler)
            handler.close()

    def _run(self) -> int:
        self._services()
        self._topics()
        client = redis.Redis.from_url(self.redis_url)
        try:
            self._features(client)
            port = self.settings.scorer_port or _free_port()
            specs = child_specs(
                self.settings, self.files, self.kafka, self.redis_url, port, self.env
            )
            monitor = Monitor(
                self.kafka,
                topic_names(self.settings),
                self.files.truth,
                self.files.served_log,
                self.files.learner_history,
                f"http://127.0.0.1:{port}",
                self.settings.metrics_window,
            )
            registry = SnapshotRegistry(
                client, self.serving.model_name, self.settings.redis_namespace
            )
            with Supervisor(self.settings.stop_timeout_s) as supervisor:
                for spec in specs:
                    supervisor.start(spec)
                with _stderr_quiet(self.view):
                    code = self._loop(supervisor, monitor, registry)
                logger.info("stopping (%s)", self.stopped_by)
                codes = supervisor.stop(STOP_ORDER)
            summary = self._summary(monitor, codes, client, code)
            monitor.close()
            self.files.summary.write_bytes(
                orjson.dumps(summary, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
            )
            self.out.write(format_summary(summary) + "\n")
            self.out.flush()
            self._cleanup(client)
            return code
        finally:
            client.close()
