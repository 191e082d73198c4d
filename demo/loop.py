"""The closed loop: the simulator's ranker asks the live scorer, and logs what it served.

:class:`ClosedLoopRanker` is a ``stream.simulate.Ranker``: for each simulated request it calls
``POST /v1/rank`` and shows the scorer's top items, so the impressions the simulator emits (and
the stream joins, and the learner trains on) are the ones the model chose. When the scorer cannot
answer (still starting, no snapshot yet, an error) the world's own ranking is shown instead and
the fallback is counted by reason: the loop never stops on a scorer problem.

Each request leaves one line in the served log (JSONL), enough to measure the ranking against
the oracle afterwards::

    {"ts": wall ms, "sim_ts": event ms, "request_id", "user_id",
     "model_version": int | null, "fallback": reason | null, "latency_ms": float,
     "items": [candidate ids, request order], "scores": [fused score per item] | null,
     "ctr": [predicted ctr per item] | null,
     "p_click": [true P(click) at position 0], "p_conv": [...], "exp_ysl": [...],
     "shown": [ids shown, top first]}

Examples
--------
>>> from stream.world import World, WorldConfig
>>> world = World(WorldConfig(seed=1, n_users=20, n_items=60))
>>> def down(user_id: str, candidates: Sequence[str]) -> RankResult:
...     raise RankError(503, "no_model", "no model snapshot is loaded yet")
>>> ranker = ClosedLoopRanker(world, down)
>>> request = world.sample_request(world.now_ms)
>>> len(ranker(request)), dict(ranker.fallbacks)
(10, {'no_model': 1})
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol

import httpx
import orjson
from redis.exceptions import RedisError

from feature_store.errors import FeatureStoreError
from feature_store.keys import Entity
from feature_store.store import FeatureStore, FeatureWrite
from serving.client import RankClient, RankError, RankResult
from stream.world import Request, World, item_key, user_key

__all__ = [
    "ClosedLoopRanker",
    "FeatureSink",
    "FeatureWriter",
    "RankFn",
    "ServedLog",
    "closed_loop",
    "item_feature_rows",
    "load_world_features",
    "redis_feature_sink",
    "user_feature_rows",
]

logger = logging.getLogger(__name__)

# (user_id, candidates) -> the scorer's answer; RankClient.rank fits
RankFn = Callable[[str, Sequence[str]], RankResult]
# writes item feature rows somewhere the scorer reads them (Redis)
FeatureSink = Callable[[list[FeatureWrite]], None]

# What a scorer that is away, starting or broken raises through the client: the loop falls back.
_UNAVAILABLE = (httpx.HTTPError, OSError, ValueError, KeyError, TypeError)
_WRITE_BATCH = 1000


def user_feature_rows(world: World, ts_ms: int) -> Iterator[FeatureWrite]:
    """Every user's stored features (segment, activity) as rows for the feature store."""
    for user in range(world.config.n_users):
        yield FeatureWrite(user_key(user), world.user_features(user), ts_ms)


def item_feature_rows(world: World, items: range, ts_ms: int) -> Iterator[FeatureWrite]:
    """Stored features (category, price, age) of the items ``items`` (indices) now."""
    for item in items:
        yield FeatureWrite(item_key(item), world.item_features(item), ts_ms)


def _batches(rows: Iterator[FeatureWrite], size: int) -> Iterator[list[FeatureWrite]]:
    batch: list[FeatureWrite] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class FeatureWriter(Protocol):
    """The part of :class:`feature_store.store.FeatureStore` the loader uses."""

    def write(self, entity: Entity, rows: Iterable[FeatureWrite]) -> int:
        """Write rows in one round trip; return how many applied."""
        ...


def load_world_features(store: FeatureWriter, world: World) -> tuple[int, int]:
    """Write every user's and every current item's features; return (users, items) written."""
    ts = world.now_ms
    users = items = 0
    for batch in _batches(user_feature_rows(world, ts), _WRITE_BATCH):
        store.write("user", batch)
        users += len(batch)
    for batch in _batches(item_feature_rows(world, range(world.n_items), ts), _WRITE_BATCH):
        store.write("item", batch)
        items += len(batch)
    return users, items


def redis_feature_sink(redis_url: str, namespace: str) -> tuple[FeatureSink, Callable[[], None]]:
    """A sink writing item rows to Redis, and the function that closes its client."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=5.0)
    store = FeatureStore(client, namespace)

    def sink(rows: list[FeatureWrite]) -> None:
        store.write("item", rows)

    return sink, client.close


class ServedLog:
    """Appends one JSON object per line; every line is flushed, so a reader sees whole lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[bytes] = path.open("ab")

    def write(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` as one line."""
        self._file.write(orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __enter__(self) -> ServedLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _fallback_reason(exc: BaseException) -> str:
    if isinstance(exc, RankError):
        return exc.code
    return type(exc).__name__


class ClosedLoopRanker:
    """Ranks each simulated request with the live scorer; falls back to the world's ranking.

    Parameters
    ----------
    world
        The world the simulator runs (the same object): its truth and default ranking.
    rank
        Calls the scorer, e.g. ``RankClient(url).rank``.
    log
        Where each served request is recorded (None: nowhere).
    features
        Where features of items that appear during the run are written (None: not written;
        the scorer then scores them with default features).
    clock
        Wall clock in seconds, injectable for tests.
    """

    def __init__(
        self,
        world: World,
        rank: RankFn,
        log: ServedLog | None = None,
        features: FeatureSink | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.world = world
        self.rank = rank
        self.log = log
        self.features = features
        self.clock = clock
        self.requests = 0
        self.fallbacks: Counter[str] = Counter()
        self._known_items = world.n_items  # items whose features are already stored

    def __call__(self, request: Request) -> list[str]:
        """Return the item ids to show for ``request``, best first."""
        self.requests += 1
        self._store_new_items(request.ts)
        candidates = request.candidate_ids
        started = time.perf_counter()
        result: RankResult | None = None
        reason: str | None = None
        try:
            result = self.rank(request.user_id, candidates)
        except (RankError, *_UNAVAILABLE) as exc:
            reason = _fallback_reason(exc)
        latency_ms = (time.perf_counter() - started) * 1000.0
        if result is None:
            self.fallbacks[reason or "error"] += 1
            shown = self.world.default_ranking(request)
        else:
            shown = [item.item_id for item in result.items[: self.world.config.shown_per_request]]
        if self.log is not None:
            self.log.write(self._record(request, result, reason, shown, latency_ms))
        return shown

    def _record(
        self,
        request: Request,
        result: RankResult | None,
        reason: str | None,
        shown: list[str],
        latency_ms: float,
    ) -> dict[str, Any]:
        candidates = request.candidate_ids
        truths = self.world.truth_many(request.user_id, candidates, request.ts)
        record: dict[str, Any] = {
            "ts": int(self.clock() * 1000),
            "sim_ts": request.ts,
            "request_id": request.request_id,
            "user_id": request.user_id,
            "model_version": None if result is None else result.model_version,
            "fallback": reason,
            "latency_ms": round(latency_ms, 3),
            "items": candidates,
            "scores": None,
            "ctr": None,
            "p_click": [t.p_click for t in truths],
            "p_conv": [t.p_conv for t in truths],
            "exp_ysl": [t.exp_ysl for t in truths],
            "shown": shown,
        }
        if result is not None:
            by_id = {item.item_id: item for item in result.items}
            ranked = [by_id.get(i) for i in candidates]
            record["scores"] = [None if r is None else r.score for r in ranked]
            record["ctr"] = [None if r is None else r.tasks.get("ctr") for r in ranked]
        return record

    def _store_new_items(self, ts_ms: int) -> None:
        """Write the features of items that appeared since the last request (cold start)."""
        now_items = self.world.n_items
        if self.features is None or now_items <= self._known_items:
            return
        rows = list(item_feature_rows(self.world, range(self._known_items, now_items), ts_ms))
        try:
            self.features(rows)
        except (RedisError, OSError, FeatureStoreError) as exc:  # never stop the traffic
            logger.warning("new item features not written (%d items): %s", len(rows), exc)
            return
        self._known_items = now_items


def closed_loop(
    world: World,
    scorer_url: str,
    served_log: Path | None,
    features: FeatureSink | None = None,
    timeout_s: float = 2.0,
) -> tuple[ClosedLoopRanker, Callable[[], None]]:
    """A ranker calling the scorer at ``scorer_url``, and the function that releases it."""
    client = RankClient(scorer_url, timeout_s=timeout_s)
    log = ServedLog(served_log) if served_log is not None else None
    ranker = ClosedLoopRanker(world, client.rank, log, features)

    def close() -> None:
        client.close()
        if log is not None:
            log.close()
        logger.info("closed loop requests=%d fallbacks=%s", ranker.requests, dict(ranker.fallbacks))

    return ranker, close
