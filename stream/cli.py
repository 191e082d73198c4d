"""`mtlstream stream`: run the join worker (a faust worker over the three input topics)."""

from __future__ import annotations

import argparse
import logging

__all__ = ["configure", "main"]

logger = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the `stream` arguments (everything else comes from the environment)."""
    parser.add_argument("--loglevel", default="info", help="faust worker log level (default info)")


def main(args: argparse.Namespace) -> int:
    """Start the faust worker until SIGTERM / Ctrl-C."""
    from faust.worker import Worker

    from stream.app import app, settings
    from stream.topics import ensure_topics

    logger.info(
        "stream worker app_id=%s kafka=%s partitions=%s mode=%s",
        settings.app_id,
        settings.kafka_bootstrap,
        settings.partitions,
        settings.mode,
    )
    ensure_topics(settings)
    Worker(app, loglevel=args.loglevel, quiet=True).execute_from_commandline()
    return 0  # pragma: no cover - execute_from_commandline exits itself
