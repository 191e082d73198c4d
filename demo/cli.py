"""`mtlstream demo`: the whole system on one machine, with a live view and a summary.

Every flag overrides the environment variable of the same setting (:class:`DemoSettings`);
flags not given fall through to the environment, then to the defaults.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from demo.runner import DemoRun
from demo.settings import DemoSettings, from_env

__all__ = ["configure", "main", "settings_from_args"]

logger = logging.getLogger(__name__)

# flag -> (settings field, type, help)
_FLAGS: dict[str, tuple[str, type, str]] = {
    "--duration": ("duration_s", float, "wall seconds of traffic (MTL_DEMO_DURATION_S, 180)"),
    "--out": ("out_dir", str, "output folder (MTL_DEMO_OUT, .mtlstream/demo/<run id>)"),
    "--speedup": ("speedup", float, "simulated seconds per wall second (MTL_DEMO_SPEEDUP, 60)"),
    "--rate": ("rate", float, "events per wall second (MTL_DEMO_RATE, 300)"),
    "--seed": ("seed", int, "world seed (MTL_DEMO_SEED)"),
    "--users": ("users", int, "simulated users (MTL_DEMO_USERS)"),
    "--items": ("items", int, "simulated items at start (MTL_DEMO_ITEMS)"),
    "--window": ("window_s", float, "click / follow-on windows, simulated s (MTL_DEMO_WINDOW_S)"),
    "--rotation": ("rotation_deg_per_h", float, "preference drift, deg per simulated hour"),
    "--pop-std": ("pop_std", float, "item popularity spread, logit (MTL_DEMO_POP_STD)"),
    "--pop-tau": ("pop_tau_h", float, "popularity memory, simulated hours (MTL_DEMO_POP_TAU_H)"),
    "--partitions": ("partitions", int, "partitions per topic (MTL_DEMO_PARTITIONS)"),
    "--publish-every": ("publish_every_s", float, "snapshot period, s (MTL_DEMO_PUBLISH_EVERY_S)"),
    "--metrics-window": ("metrics_window", int, "rolling metrics window, samples"),
    "--scorer-port": ("scorer_port", int, "scorer port, 0 = free (MTL_DEMO_SCORER_PORT)"),
    "--scorer-runtime": ("scorer_runtime", str, "auto | onnx | torch (MTL_DEMO_SCORER_RUNTIME)"),
    "--run-id": ("run_id", str, "names the run's topics and keys (MTL_DEMO_RUN_ID)"),
    "--namespace": ("namespace", str, "Redis key prefix (MTL_DEMO_NAMESPACE)"),
    "--stop-timeout": ("stop_timeout_s", float, "SIGTERM grace per child, s"),
    "--refresh": ("refresh_s", float, "view refresh, s (MTL_DEMO_REFRESH_S)"),
}


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the `demo` flags."""
    for flag, (dest, kind, help_text) in _FLAGS.items():
        parser.add_argument(flag, dest=dest, type=kind, help=help_text)
    parser.add_argument(
        "--no-view",
        dest="view",
        action="store_const",
        const=False,
        help="no live view: a status line every MTL_DEMO_STATUS_EVERY_S instead",
    )
    parser.add_argument(
        "--no-counters",
        dest="counters",
        action="store_const",
        const=False,
        help="no live item counters from the stream worker (MTL_DEMO_COUNTERS)",
    )
    parser.add_argument(
        "--keep-data",
        dest="keep_data",
        action="store_const",
        const=True,
        help="keep the run's topics and Redis keys at the end (MTL_DEMO_KEEP_DATA)",
    )


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    """Build the settings: environment first, given flags on top."""
    overrides: dict[str, Any] = {dest: getattr(args, dest, None) for dest, _, _ in _FLAGS.values()}
    for dest in ("view", "counters", "keep_data"):
        overrides[dest] = getattr(args, dest, None)
    return from_env(DemoSettings, **overrides)


def main(args: argparse.Namespace) -> int:
    """Run the demo; the exit code is 0 after ``--duration``, non-zero when it was cut short."""
    settings = settings_from_args(args)
    # the monitor polls the scorer a few times a second: httpx's per-request INFO lines are noise
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logger.info(
        "demo run=%s duration_s=%g out=%s", settings.run_id, settings.duration_s, settings.out_path
    )
    return DemoRun(settings).run()
