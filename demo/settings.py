"""Settings of `mtlstream demo`: one dataclass, one environment variable per field.

Kafka and Redis come from ``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL`` when set; left empty, the
demo starts the local ones (:mod:`mtlstream.services`). Everything a run creates (topics, the
faust app id, Redis keys) is named after ``run_id``, so runs never read each other's data.

Examples
--------
>>> settings = from_env(DemoSettings, {"MTL_DEMO_DURATION_S": "30"}, run_id="r1")
>>> settings.duration_s, settings.topic("samples"), settings.redis_namespace
(30.0, 'demo-r1.samples', 'mtl:demo-r1:')
>>> from_env(DemoSettings, {"MTL_DEMO_SPEEDUP": "0"})
Traceback (most recent call last):
...
mtlstream.errors.SettingsError: invalid demo settings: MTL_DEMO_SPEEDUP > 0
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtlstream.errors import SettingsError
from mtlstream.settings import env_field, from_env

__all__ = ["DemoSettings", "from_env", "new_run_id"]

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,40}$")


def new_run_id() -> str:
    """A fresh run id: UTC time plus a short random suffix (``20240101-120000-ab12``)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:4]


@dataclass(frozen=True)
class DemoSettings:
    """Everything `mtlstream demo` reads from its environment (flags override)."""

    # --- services: empty = start the local Kafka / Redis (mtlstream services)
    kafka_bootstrap: str = env_field("", "KAFKA_BOOTSTRAP_SERVERS", "Kafka brokers")
    redis_url: str = env_field("", "REDIS_URL", "Redis URL")
    # --- the run
    # wall seconds of traffic before the summary
    duration_s: float = env_field(180.0, "MTL_DEMO_DURATION_S", "wall seconds of traffic")
    # names topics, app id and Redis keys of this run; empty = time + random suffix
    run_id: str = env_field("", "MTL_DEMO_RUN_ID", "run id (topic/key names)")
    # output folder (logs, served log, summary, plots); empty = .mtlstream/demo/<run_id>
    out_dir: str = env_field("", "MTL_DEMO_OUT", "output folder")
    # Redis key prefix of the run; empty = mtl:demo-<run_id>:
    namespace: str = env_field("", "MTL_DEMO_NAMESPACE", "Redis key prefix")
    # keep the run's topics and Redis keys at the end (default: deleted)
    keep_data: bool = env_field(False, "MTL_DEMO_KEEP_DATA", "keep topics and keys")
    # --- the simulated world
    seed: int = env_field(0, "MTL_DEMO_SEED", "world seed")
    # simulated seconds per wall second
    speedup: float = env_field(60.0, "MTL_DEMO_SPEEDUP", "sim seconds per wall second")
    # events (impressions + clicks + follow-ons) per wall second
    rate: float = env_field(300.0, "MTL_DEMO_RATE", "events per wall second")
    # a small world with strong item effects: a model learns it in a minute or two of traffic
    users: int = env_field(500, "MTL_DEMO_USERS", "simulated users")
    items: int = env_field(200, "MTL_DEMO_ITEMS", "simulated items at start")
    pop_std: float = env_field(1.5, "MTL_DEMO_POP_STD", "item popularity spread (logit)")
    # click and follow-on windows (simulated s), the world's and the join's alike
    window_s: float = env_field(300.0, "MTL_DEMO_WINDOW_S", "label windows (sim s)")
    # drift: user preferences rotate this fast, item popularity reverts over this many hours
    rotation_deg_per_h: float = env_field(20.0, "MTL_DEMO_ROTATION_DEG_PER_H", "drift (deg/h)")
    pop_tau_h: float = env_field(2.0, "MTL_DEMO_POP_TAU_H", "popularity memory (sim h)")
    # --- the processes
    partitions: int = env_field(2, "MTL_DEMO_PARTITIONS", "partitions per topic")
    publish_every_s: float = env_field(5.0, "MTL_DEMO_PUBLISH_EVERY_S", "snapshot period (s)")
    # rolling window of the progressive metrics, the learner's and the oracle's
    metrics_window: int = env_field(5000, "MTL_DEMO_METRICS_WINDOW", "metrics window (samples)")
    # scorer port; 0 = a free one
    scorer_port: int = env_field(0, "MTL_DEMO_SCORER_PORT", "scorer port (0: free)")
    # the scorer's model runtime (torch swaps in a snapshot fastest, ONNX serves fastest)
    scorer_runtime: str = env_field("torch", "MTL_DEMO_SCORER_RUNTIME", "auto | onnx | torch")
    # live item counters from the stream worker
    counters: bool = env_field(True, "MTL_DEMO_COUNTERS", "live item counters")
    # seconds a child gets to exit after SIGTERM before SIGKILL
    stop_timeout_s: float = env_field(10.0, "MTL_DEMO_STOP_TIMEOUT_S", "SIGTERM grace (s)")
    # --- the live view
    view: bool = env_field(True, "MTL_DEMO_VIEW", "live terminal view")
    refresh_s: float = env_field(0.4, "MTL_DEMO_REFRESH_S", "view refresh (s)")
    # without the view: a status line this often
    status_every_s: float = env_field(10.0, "MTL_DEMO_STATUS_EVERY_S", "status line period (s)")

    def __post_init__(self) -> None:
        """Fill in derived names and reject values the demo cannot honour, naming each."""
        if not self.run_id:
            object.__setattr__(self, "run_id", new_run_id())
        checks = {
            "MTL_DEMO_RUN_ID matches [A-Za-z0-9][A-Za-z0-9_-]{0,40}": bool(
                _RUN_ID.match(self.run_id)
            ),
            "MTL_DEMO_DURATION_S > 0": self.duration_s > 0,
            "MTL_DEMO_SPEEDUP > 0": self.speedup > 0,
            "MTL_DEMO_RATE > 0": self.rate > 0,
            "MTL_DEMO_USERS >= 1": self.users >= 1,
            "MTL_DEMO_ITEMS >= 50": self.items >= 50,
            "MTL_DEMO_WINDOW_S >= 120": self.window_s >= 120,
            "MTL_DEMO_ROTATION_DEG_PER_H >= 0": self.rotation_deg_per_h >= 0,
            "MTL_DEMO_POP_TAU_H > 0": self.pop_tau_h > 0,
            "MTL_DEMO_POP_STD >= 0": self.pop_std >= 0,
            "MTL_DEMO_PARTITIONS >= 1": self.partitions >= 1,
            "MTL_DEMO_PUBLISH_EVERY_S > 0": self.publish_every_s > 0,
            "MTL_DEMO_METRICS_WINDOW >= 1": self.metrics_window >= 1,
            "0 <= MTL_DEMO_SCORER_PORT < 65536": 0 <= self.scorer_port < 65536,
            "MTL_DEMO_SCORER_RUNTIME in (auto, onnx, torch)": self.scorer_runtime
            in ("auto", "onnx", "torch"),
            "MTL_DEMO_STOP_TIMEOUT_S > 0": self.stop_timeout_s > 0,
            "MTL_DEMO_REFRESH_S > 0": self.refresh_s > 0,
            "MTL_DEMO_STATUS_EVERY_S > 0": self.status_every_s > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise SettingsError(f"invalid demo settings: {', '.join(bad)}")

    @property
    def prefix(self) -> str:
        """Prefix of the run's topic names and faust app id."""
        return f"demo-{self.run_id}"

    def topic(self, kind: str) -> str:
        """The run's topic for ``kind`` (``impressions``, ``samples``, ...)."""
        return f"{self.prefix}.{kind}"

    @property
    def redis_namespace(self) -> str:
        """The run's Redis key prefix."""
        return self.namespace or f"mtl:{self.prefix}:"

    @property
    def out_path(self) -> Path:
        """The run's output folder."""
        return Path(self.out_dir) if self.out_dir else Path(".mtlstream/demo") / self.run_id

    def world_config(self) -> dict[str, Any]:
        """The simulated world's parameters (``stream.world.WorldConfig`` fields).

        Delays are scaled to the windows so that nearly all clicks and follow-ons land inside
        them; the world's run id is the demo's, so impression ids never repeat across runs.
        """
        return {
            "seed": self.seed,
            "run_id": self.run_id,
            "n_users": self.users,
            "n_items": self.items,
            "window_s": self.window_s,
            "click_delay_median_s": min(20.0, self.window_s / 10),
            "follow_delay_median_s": min(90.0, self.window_s / 6),
            "rotation_deg_per_h": self.rotation_deg_per_h,
            "pop_std": self.pop_std,
            "pop_tau_h": self.pop_tau_h,
        }
