"""`mtlstream features load FILE --entity user|item` and `mtlstream features get ID...`.

``load`` writes a JSONL / CSV / Parquet file's good rows (newest event time wins), shows a
progress bar on a terminal, reports each bad row as ``FILE:LINE: reason`` on stderr and ends with
one summary line; the exit code is 0 when every row was good, 1 when some were skipped.
``get`` prints the stored features of some entities as JSON lines.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
import redis

from feature_store.keys import DEFAULT_NAMESPACE
from feature_store.load import FORMATS, BadRow, LoadOptions, load_file
from feature_store.store import FeatureStore
from mtlstream.settings import DEFAULT_REDIS, env_field, from_env

__all__ = ["FeaturesSettings", "configure", "main"]


@dataclass(frozen=True)
class FeaturesSettings:
    """Where the features live."""

    redis_url: str = env_field(DEFAULT_REDIS, "REDIS_URL", "Redis URL")
    namespace: str = env_field(DEFAULT_NAMESPACE, "MTL_NAMESPACE", "Redis key prefix")


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the `features` arguments."""
    parser.add_argument("action", choices=["load", "get"])
    parser.add_argument("targets", nargs="+", metavar="FILE|ID", help="files to load / ids to get")
    parser.add_argument("--entity", choices=["user", "item"], required=True)
    parser.add_argument(
        "--format", choices=sorted(set(FORMATS.values())), help="default: by suffix"
    )
    parser.add_argument("--id-field", help="id column (default: <entity>_id)")
    parser.add_argument("--ts-field", default="ts", help="event-time column, epoch ms (default ts)")
    parser.add_argument(
        "--default-ts",
        help="event time for rows without one: epoch ms or 'now' (default: such rows are bad)",
    )
    parser.add_argument("--batch-size", type=int, default=1000, help="rows per round trip")
    parser.add_argument("--ttl-s", type=int, help="expire entities after this many seconds")
    parser.add_argument("--redis-url", help="Redis URL (env REDIS_URL)")
    parser.add_argument("--namespace", help="Redis key prefix (env MTL_NAMESPACE)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _default_ts(raw: str | None) -> int | None:
    if raw is None:
        return None
    if raw == "now":
        return int(time.time() * 1000)
    if not raw.isdigit():
        raise SystemExit(f"--default-ts must be epoch ms or 'now', got {raw!r}")
    return int(raw)


def _load(store: FeatureStore, args: argparse.Namespace) -> int:
    options = LoadOptions(
        entity=args.entity,
        id_field=args.id_field,
        ts_field=args.ts_field,
        default_ts_ms=_default_ts(args.default_ts),
        batch_size=args.batch_size,
        ttl_s=args.ttl_s,
    )
    any_bad = False
    for target in args.targets:
        path = Path(target)

        def report_bad(row: BadRow, path: Path = path) -> None:
            sys.stderr.write(f"{path}:{row.line}: bad row: {row.reason}\n")

        report = load_file(
            store,
            path,
            options,
            fmt=args.format,
            progress=not args.no_progress and sys.stderr.isatty(),
            on_bad=report_bad,
        )
        sys.stdout.write(f"features load file={path} entity={args.entity} {report.line()}\n")
        any_bad = any_bad or report.bad > 0
    return 1 if any_bad else 0


def _get(store: FeatureStore, args: argparse.Namespace) -> int:
    rows = store.read(args.entity, args.targets)
    for entity_id, row in zip(args.targets, rows, strict=True):
        body = None if row is None else {"features": row.features, "ts": row.ts_ms}
        sys.stdout.write(orjson.dumps({"id": entity_id, "row": body}).decode() + "\n")
    return 0 if all(r is not None for r in rows) else 1


def main(args: argparse.Namespace) -> int:
    """Run one `features` action."""
    settings = from_env(FeaturesSettings, redis_url=args.redis_url, namespace=args.namespace)
    client = redis.Redis.from_url(settings.redis_url)
    try:
        store = FeatureStore(client, settings.namespace)
        return _load(store, args) if args.action == "load" else _get(store, args)
    finally:
        client.close()
