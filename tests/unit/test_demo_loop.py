"""The closed loop: a scorer-backed ranker inside the simulator, its served log, its fallbacks."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from demo.loop import ClosedLoopRanker, ServedLog, load_world_features
from demo.metrics import grouped_soft_auc
from demo.monitor import JsonlTail
from feature_store.keys import Entity
from feature_store.store import FeatureWrite
from serving.client import RankedItem, RankError, RankResult
from stream.simulate import SimConfig, read_log, run
from stream.world import World, WorldConfig

WORLD: dict[str, Any] = {"seed": 5, "n_users": 40, "n_items": 120, "new_items_per_h": 0.0}


class OracleScorer:
    """Ranks by the world's true P(click) (what a perfect model would serve), as version 7."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.calls = 0

    def __call__(self, user_id: str, candidates: Sequence[str]) -> RankResult:
        self.calls += 1
        truth = self.world.truth_many(user_id, candidates, self.world.now_ms)
        items = [
            RankedItem(i, t.p_click, {"ctr": t.p_click})
            for i, t in zip(candidates, truth, strict=True)
        ]
        items.sort(key=lambda item: -item.score)
        return RankResult(7, items, "rid")


def test_the_simulator_shows_what_the_scorer_ranked_first(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    config = SimConfig.from_dict(
        {**WORLD, "max_impressions": 300, "duration_s": None, "log_file": events}
    )
    world = World(config.world)
    scorer = OracleScorer(world)
    with ServedLog(tmp_path / "served.jsonl") as log:
        ranker = ClosedLoopRanker(world, scorer, log)
        stats = run(config, ranker, world=world)
    assert stats.records["impressions"] == 300 and scorer.calls == 30
    records = JsonlTail(tmp_path / "served.jsonl").read()
    assert len(records) == 30 and not ranker.fallbacks
    for record in records:
        by_score = sorted(zip(record["scores"], record["items"], strict=True), reverse=True)
        assert record["shown"] == [item for _, item in by_score[:10]]
        assert record["model_version"] == 7 and record["fallback"] is None
        assert len(record["items"]) == len(record["p_click"]) == 50
    # the impressions the simulator emitted are the served slates, in served order
    shown = [v["item_id"] for topic, _, v in read_log(events) if topic == "impressions"]
    assert shown == [item for r in records for item in r["shown"]]
    # ranked by the truth itself, the served log's AUC is the oracle's (ceiling), far above random
    served = grouped_soft_auc((r["scores"], r["p_click"]) for r in records)
    rng = np.random.default_rng(0)
    random = grouped_soft_auc((rng.random(50), r["p_click"]) for r in records)
    assert served == pytest.approx(grouped_soft_auc((r["p_click"], r["p_click"]) for r in records))
    assert served > random + 0.2


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (RankError(503, "no_model", "no model snapshot is loaded yet"), "no_model"),
        (httpx.ConnectError("refused"), "ConnectError"),
        (httpx.ReadTimeout("slow"), "ReadTimeout"),
        (ValueError("garbled body"), "ValueError"),
    ],
)
def test_scorer_trouble_falls_back_to_the_world_ranking(
    tmp_path: Path, error: Exception, reason: str
) -> None:
    world = World(WorldConfig(**WORLD))

    def failing(user_id: str, candidates: Sequence[str]) -> RankResult:
        raise error

    with ServedLog(tmp_path / "served.jsonl") as log:
        ranker = ClosedLoopRanker(world, failing, log)
        request = world.sample_request(world.now_ms)
        shown = ranker(request)
    assert len(shown) == 10 and set(shown) <= set(request.candidate_ids)
    assert dict(ranker.fallbacks) == {reason: 1}
    (record,) = JsonlTail(tmp_path / "served.jsonl").read()
    assert record["fallback"] == reason and record["model_version"] is None
    assert record["scores"] is None and record["shown"] == shown
    assert len(record["p_click"]) == 50  # the truth is logged all the same


class FakeStore:
    """Records writes like FeatureStore.write."""

    def __init__(self) -> None:
        self.rows: dict[Entity, list[FeatureWrite]] = {"user": [], "item": []}

    def write(self, entity: Entity, rows: Iterable[FeatureWrite]) -> int:
        batch = list(rows)
        self.rows[entity] += batch
        return len(batch)


def test_world_features_are_loaded_for_every_user_and_item() -> None:
    world = World(WorldConfig(**{**WORLD, "n_items": 1500}))
    store = FakeStore()
    assert load_world_features(store, world) == (40, 1500)
    users, items = store.rows["user"], store.rows["item"]
    assert [r.entity_id for r in users] == [f"u{k}" for k in range(40)]
    assert len({r.entity_id for r in items}) == 1500
    request = world.sample_request(world.now_ms)
    # what the impressions carry (features.md names) is what the store got, ids and counters aside
    seen = world.features(request, request.candidate_ids[:3])
    stored = {r.entity_id: dict(r.features) for r in items}
    user = next(r.features for r in users if r.entity_id == request.user_id)
    for row in seen:
        expected = {k: v for k, v in row.items() if k not in ("user_id", "item_id", "item_ctr_1h")}
        assert {**user, **stored[row["item_id"]]} == expected


def test_new_items_get_their_features_written_once() -> None:
    world = World(WorldConfig(**{**WORLD, "new_items_per_h": 600.0}))
    written: list[list[FeatureWrite]] = []
    ranker = ClosedLoopRanker(world, OracleScorer(world), features=written.append)
    start = world.n_items
    ranker(world.sample_request(world.now_ms + 3_600_000))
    assert world.n_items > start
    assert [r.entity_id for r in written[0]] == [f"i{k}" for k in range(start, world.n_items)]
    ranker(world.sample_request(world.now_ms + 1))
    assert len(written) == 1  # nothing new since


def test_a_failing_feature_write_never_stops_the_loop() -> None:
    world = World(WorldConfig(**{**WORLD, "new_items_per_h": 600.0}))

    def broken(rows: list[FeatureWrite]) -> None:
        raise OSError("redis away")

    ranker = ClosedLoopRanker(world, OracleScorer(world), features=broken)
    assert len(ranker(world.sample_request(world.now_ms + 3_600_000))) == 10
