"""The `mtlstream` console script: one verb per process, each owned by its package.

The dispatcher imports only the module of the verb being run, so `mtlstream services up` does not
pay for importing torch. Each verb module exposes ``configure(parser)`` and ``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging.config
import os
import sys
from collections.abc import Sequence
from typing import Protocol, cast

from mtlstream import __version__
from mtlstream.errors import MtlstreamError

__all__ = ["COMMANDS", "main"]

logger = logging.getLogger(__name__)

#: verb -> (module that implements it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "services": (
        "mtlstream.services_cli",
        "start, stop or inspect the local Kafka broker and Redis",
    ),
    "serve": ("serving.cli", "run the HTTP scorer (POST /v1/rank), or --check its health"),
    "features": ("feature_store.cli", "load user/item features from JSONL, CSV or Parquet"),
    "stream": ("stream.cli", "run the join worker: events -> delayed-label samples"),
    "simulate": ("stream.simulate_cli", "produce synthetic traffic with known ground truth"),
    "learn": ("learner.cli", "run the online learner: samples -> training -> Redis snapshots"),
    "model": ("feature_store.model_cli", "list, show or roll back model snapshots in Redis"),
    "report": ("learner.report", "plot the learner's metrics and expert utilisation (PNG)"),
    "demo": (
        "demo.cli",
        "run everything in a closed loop with a live view, then a summary and plots",
    ),
    "evaluate": ("evaluation.cli", "offline comparison of the models on public and synthetic data"),
}


class VerbModule(Protocol):
    """What a verb module provides."""

    def configure(self, parser: argparse.ArgumentParser) -> None: ...

    def main(self, args: argparse.Namespace) -> int: ...


def setup_logging(level: str) -> None:
    """Configure logging once, at the entry point: one `key=value`-friendly line per record."""
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {
                "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
            },
            "handlers": {
                "stderr": {
                    "class": "logging.StreamHandler",
                    "formatter": "plain",
                    "stream": "ext://sys.stderr",
                },
            },
            "root": {"handlers": ["stderr"], "level": level.upper()},
            # client libraries are chatty at INFO: keep their warnings only
            "loggers": {
                **{name: {"level": "WARNING"} for name in ("kafka", "aiokafka", "faust")},
                # keeps faust's "Worker ready" line (after table recovery) visible
                "faust.tables.recovery": {"level": "INFO"},
            },
        }
    )


def _top_parser() -> argparse.ArgumentParser:
    epilog = "verbs:\n" + "\n".join(f"  {n:<10} {h}" for n, (_, h) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="mtlstream",
        description="Streaming online learning for multi-task ranking.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mtlstream {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("MTL_LOG_LEVEL", "INFO"),
        help="logging level (env MTL_LOG_LEVEL, default INFO)",
    )
    parser.add_argument("verb", choices=sorted(COMMANDS), help="what to run")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the verb, hand the rest of the command line to its module and return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    split = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    if split < len(argv) and argv[split - 1 : split] == ["--log-level"]:
        split = next(
            (i for i, a in enumerate(argv) if i > split and not a.startswith("-")), len(argv)
        )
    head = top.parse_args(argv[: split + 1])
    module_name, help_text = COMMANDS[head.verb]
    module = cast(VerbModule, importlib.import_module(module_name))
    parser = argparse.ArgumentParser(prog=f"mtlstream {head.verb}", description=help_text)
    module.configure(parser)
    args = parser.parse_args(argv[split + 1 :])
    setup_logging(head.log_level)
    try:
        return module.main(args)
    except MtlstreamError as exc:
        logger.error("%s: %s", type(exc).__name__, exc)
        return 2
    except KeyboardInterrupt:
        return 130
