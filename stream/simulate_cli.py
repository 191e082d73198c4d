"""`mtlstream simulate`: produce synthetic traffic with known ground truth."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import orjson

from stream.simulate import Ranker, SimConfig, run
from stream.world import World, WorldConfig

__all__ = ["configure", "main"]

logger = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the `simulate` arguments."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--impressions", type=int, help="stop after this many impressions")
    parser.add_argument("--duration", type=float, help="simulated seconds of traffic")
    parser.add_argument("--speedup", type=float, default=60.0, help="sim seconds per wall second")
    parser.add_argument("--rate", type=float, default=1000.0, help="target events per second")
    parser.add_argument(
        "--pacing", choices=["sim", "wall", "none"], default="sim", help="how sends are paced"
    )
    parser.add_argument("--rho", type=float, help="task correlation in [0, 1]")
    parser.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"))
    parser.add_argument(
        "--check", action="store_true", help="exit 0 when the Kafka broker answers, else 1"
    )
    parser.add_argument("--no-kafka", action="store_true", help="write files only")
    parser.add_argument("--log-file", type=Path, help="also write the event log (JSONL)")
    parser.add_argument("--truth-file", type=Path, help="write true probabilities (JSONL)")
    parser.add_argument("--dup-rate", type=float, default=0.0)
    parser.add_argument("--bad-rate", type=float, default=0.0)
    parser.add_argument(
        "--world", help='world parameters as a JSON object of WorldConfig fields: {"n_users": 500}'
    )
    parser.add_argument(
        "--scorer", help="close the loop: rank every request with the scorer at this URL"
    )
    parser.add_argument(
        "--served-log", type=Path, help="with --scorer: one JSON line per served request"
    )
    parser.add_argument(
        "--write-item-features",
        action="store_true",
        help="with --scorer: write new items' features to Redis (REDIS_URL, MTL_NAMESPACE)",
    )


class _TerminatedError(Exception):
    """SIGTERM arrived: unwind the generators so files and the producer are closed."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise _TerminatedError(signal.Signals(signum).name)


def _world_values(text: str | None) -> dict[str, Any]:
    """Parse ``--world``: a JSON object whose keys are WorldConfig fields."""
    if not text:
        return {}
    values = orjson.loads(text)
    if not isinstance(values, dict):
        raise ValueError(f"--world must be a JSON object, got {text!r}")
    unknown = set(values) - {f.name for f in dataclasses.fields(WorldConfig)}
    if unknown:
        raise ValueError(f"--world: unknown WorldConfig fields {sorted(unknown)}")
    return values


def _closed_loop(
    args: argparse.Namespace, config: SimConfig
) -> tuple[Ranker | None, World | None, Callable[[], None]]:
    """The scorer-backed ranker of ``--scorer`` (the demo's closed loop), or none."""
    if not args.scorer:
        return None, None, lambda: None
    from demo.loop import closed_loop, redis_feature_sink  # deferred: only the loop needs it

    world = World(config.world)
    sink, close_sink = None, None
    if args.write_item_features:
        redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
        sink, close_sink = redis_feature_sink(redis_url, os.environ.get("MTL_NAMESPACE", "mtl:"))
    ranker, close_ranker = closed_loop(world, args.scorer, args.served_log, sink)

    def close() -> None:
        close_ranker()
        if close_sink is not None:
            close_sink()

    return ranker, world, close


def check(bootstrap: str | None) -> int:
    """Return 0 when a Kafka bootstrap server accepts a TCP connection within 3 s, else 1.

    The compose healthcheck of the simulator, whose one dependency is the broker; kafka-python's
    own clients retry for longer than a healthcheck may take.
    """
    addresses = (bootstrap or "127.0.0.1:9092").split(",")
    for address in addresses:
        host, _, port = address.strip().rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=3.0):
                logger.info("simulate check: Kafka at %s answers", address)
                return 0
        except (OSError, ValueError) as exc:
            logger.warning("simulate check: %s: %r", address, exc)
    logger.error("simulate check: no Kafka bootstrap server answers (%s)", bootstrap)
    return 1


def main(args: argparse.Namespace) -> int:
    """Run the simulator and log a summary line (or, with --check, check its broker)."""
    if args.check:
        return check(args.bootstrap)
    values: dict[str, Any] = {
        "seed": args.seed,
        "max_impressions": args.impressions,
        "duration_s": args.duration,
        "speedup": args.speedup,
        "target_eps": args.rate,
        "pacing": args.pacing,
        "bootstrap_servers": None if args.no_kafka else args.bootstrap,
        "log_file": args.log_file,
        "truth_file": args.truth_file,
        "dup_rate": args.dup_rate,
        "bad_rate": args.bad_rate,
        "impressions_topic": os.environ.get("MTL_IMPRESSIONS_TOPIC", "impressions"),
        "clicks_topic": os.environ.get("MTL_CLICKS_TOPIC", "clicks"),
        "follow_clicks_topic": os.environ.get("MTL_FOLLOW_CLICKS_TOPIC", "follow_clicks"),
    }
    if args.rho is not None:
        values["rho"] = args.rho
    values.update(_world_values(args.world))
    if args.impressions is not None and args.duration is None:
        values["duration_s"] = None
    config = SimConfig.from_dict(values)
    ranker, world, close = _closed_loop(args, config)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        stats = run(config, ranker, world=world)
    except _TerminatedError:
        logger.info("simulate stopped by SIGTERM")
        return 0
    finally:
        close()
    logger.info("simulate %s", stats.summary())
    return 0
