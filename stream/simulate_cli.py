"""`mtlstream simulate`: produce synthetic traffic with known ground truth."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from stream.simulate import SimConfig, run

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
    parser.add_argument("--no-kafka", action="store_true", help="write files only")
    parser.add_argument("--log-file", type=Path, help="also write the event log (JSONL)")
    parser.add_argument("--truth-file", type=Path, help="write true probabilities (JSONL)")
    parser.add_argument("--dup-rate", type=float, default=0.0)
    parser.add_argument("--bad-rate", type=float, default=0.0)


def main(args: argparse.Namespace) -> int:
    """Run the simulator and log a summary line."""
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
    if args.impressions is not None and args.duration is None:
        values["duration_s"] = None
    stats = run(SimConfig.from_dict(values))
    logger.info("simulate %s", stats.summary())
    return 0
