"""`mtlstream model versions|show|rollback`: inspect the snapshot registry and roll back.

A rollback points ``latest`` at an older, intact version and announces it, so every scorer
swaps to it. A running learner keeps publishing: its next snapshot becomes ``latest`` again,
so stop the learner (or fix what it learns from) before rolling back for good.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass

import orjson
import redis

from feature_store.errors import FeatureStoreError
from feature_store.registry import SnapshotRegistry
from mtlstream.settings import DEFAULT_REDIS, env_field, from_env

__all__ = ["RegistrySettings", "configure", "main"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistrySettings:
    """Where the snapshots live."""

    redis_url: str = env_field(DEFAULT_REDIS, "REDIS_URL", "Redis holding the snapshots")
    namespace: str = env_field("mtl:", "MTL_NAMESPACE", "Redis key prefix")
    model_name: str = env_field("ple", "MTL_MODEL_NAME", "snapshot name in the registry")


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the `model` arguments."""
    parser.add_argument("action", choices=["versions", "show", "rollback"])
    parser.add_argument("version", nargs="?", type=int, help="snapshot version (show, rollback)")
    parser.add_argument("--model-name", help="snapshot name (env MTL_MODEL_NAME)")
    parser.add_argument("--redis-url", help="Redis URL (env REDIS_URL)")


def main(args: argparse.Namespace) -> int:
    """Run one registry action and print its result."""
    settings = from_env(RegistrySettings, model_name=args.model_name, redis_url=args.redis_url)
    client = redis.Redis.from_url(settings.redis_url)
    registry = SnapshotRegistry(client, name=settings.model_name, namespace=settings.namespace)
    out = sys.stdout
    try:
        if args.action == "versions":
            latest = registry.latest_version()
            for v in registry.versions():
                out.write(f"{v}{' latest' if v == latest else ''}\n")
            return 0
        if args.action == "show":
            snap = registry.load(args.version)
            meta = {k: v for k, v in snap.meta.items() if k not in ("model_args", "feature_spec")}
            out.write(orjson.dumps({"version": snap.version, **meta}).decode() + "\n")
            return 0
        if args.version is None:
            raise SystemExit("mtlstream model rollback needs a VERSION (see `model versions`)")
        previous = registry.rollback(args.version)
        out.write(f"latest: {previous} -> {args.version}\n")
        return 0
    except (FeatureStoreError, redis.RedisError) as exc:
        logger.error("%s: %s", type(exc).__name__, exc)
        return 2
    finally:
        client.close()
