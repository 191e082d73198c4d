"""`mtlstream stream`: run the join worker (a faust worker over the three input topics)."""

from __future__ import annotations

import argparse
import logging

from mtlstream.settings import from_env
from stream.settings import StreamSettings

__all__ = ["check_health", "configure", "main"]

logger = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the `stream` arguments (everything else comes from the environment)."""
    parser.add_argument("--loglevel", default="info", help="faust worker log level (default info)")
    parser.add_argument(
        "--check", action="store_true", help="exit 0 if a worker's health key is alive, else 1"
    )


def check_health(settings: StreamSettings) -> bool:
    """Whether the worker of ``settings.app_id`` wrote its health key within its TTL."""
    import redis

    from feature_store.keys import KeySpace

    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2.0)
    try:
        line = client.get(KeySpace(settings.namespace).health(settings.health_process))
    except redis.RedisError as exc:
        logger.error("health check cannot reach Redis: %s", exc)
        return False
    finally:
        client.close()
    if line is None:
        logger.error("stream worker app_id=%s is not healthy: no health key", settings.app_id)
        return False
    logger.info("stream worker healthy: %r", line)
    return True


def main(args: argparse.Namespace) -> int:
    """Start the faust worker until SIGTERM / Ctrl-C (or, with --check, report its health)."""
    settings = from_env(StreamSettings)
    if args.check:
        return 0 if check_health(settings) else 1
    if settings.engine not in ("faust", "direct"):
        logger.error("MTL_STREAM_ENGINE must be faust or direct, got %r", settings.engine)
        return 2
    from stream.topics import ensure_topics

    logger.info(
        "stream worker app_id=%s kafka=%s partitions=%s mode=%s engine=%s",
        settings.app_id,
        settings.kafka_bootstrap,
        settings.partitions,
        settings.mode,
        settings.engine,
    )
    ensure_topics(settings)
    if settings.engine == "direct":
        from stream.direct import run

        return run(settings)
    from faust.worker import Worker

    from stream.app import app

    Worker(app, loglevel=args.loglevel, quiet=True).execute_from_commandline()
    return 0  # pragma: no cover - execute_from_commandline exits itself
