"""Served ranking vs random vs a frozen snapshot, on the same requests (no Redis)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch

from demo.metrics import grouped_soft_auc
from demo.quality import evaluate, frozen_model, model_served, rescore
from feature_store.registry import Snapshot
from feature_store.store import FieldRows
from learner.models import build_model
from stream.world import World, WorldConfig

WEIGHTS = {"ctr": 1.0, "cvr": 0.5, "ysl": 0.2}


class WorldFeatures:
    """Answers read_fields from the world's stored features, as Redis would after the load."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.reads = 0

    def read_fields(
        self, user_id: str, item_ids: Sequence[str], fields: Sequence[str]
    ) -> FieldRows:
        self.reads += 1
        user = self.world.user_features(int(user_id[1:]))
        items = [self.world.item_features(int(i[1:])) for i in item_ids]
        return FieldRows(
            tuple(fields),
            [user.get(f) for f in fields],
            [[row.get(f) for f in fields] for row in items],
        )


def snapshot(version: int, seed: int) -> Snapshot:
    torch.manual_seed(seed)
    model = build_model({"arch": "mmoe"})
    weights = safetensors.torch.save({k: v.contiguous() for k, v in model.state_dict().items()})
    return Snapshot(version, weights, {"model_args": model.model_args, "created_at": 1})


def requests(world: World, n: int, version: int, scores: str = "truth") -> list[dict[str, Any]]:
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        request = world.sample_request(world.now_ms + 1000)
        items = request.candidate_ids
        p = [t.p_click for t in world.truth_many(request.user_id, items, request.ts)]
        served = list(p) if scores == "truth" else list(rng.random(len(items)))
        out.append(
            {
                "user_id": request.user_id,
                "items": items,
                "model_version": version,
                "scores": served,
                "ctr": served,
                "p_click": p,
            }
        )
    return out


def test_rescoring_in_chunks_equals_the_scorer_path_per_request() -> None:
    world = World(WorldConfig(seed=2, n_users=30, n_items=100))
    model = frozen_model(snapshot(1, seed=0), WEIGHTS)
    store = WorldFeatures(world)
    records = requests(world, 7, version=2)
    chunked = rescore(model, store, records, WEIGHTS, chunk=3)
    assert store.reads == 7
    ctr = model.tasks.index("ctr")
    for record, (scores, ctr_preds) in zip(records, chunked, strict=True):
        found = store.read_fields(record["user_id"], record["items"], model.fields)
        one = model.score_request(record["user_id"], record["items"], found, {}, WEIGHTS)
        assert scores == pytest.approx(one.scores.tolist(), rel=1e-5)
        assert ctr_preds == pytest.approx(one.preds[:, ctr].tolist(), rel=1e-5)


def test_served_beats_random_and_frozen_only_on_later_requests() -> None:
    world = World(WorldConfig(seed=3, n_users=30, n_items=100))
    frozen = frozen_model(snapshot(4, seed=1), WEIGHTS)
    store = WorldFeatures(world)
    fallback = {"user_id": "u1", "items": ["i1"], "model_version": None, "scores": None}
    records = [
        *requests(world, 5, version=3, scores="random"),  # older than the frozen one: ignored
        *requests(world, 5, version=4, scores="random"),  # the frozen one itself: ignored
        *requests(world, 60, version=9),  # a newer model that ranks by the truth
        fallback,
    ]
    report = evaluate(records, frozen, store, WEIGHTS, seed=0)
    assert report.requests == 60 and report.frozen_version == 4
    assert report.served_auc == pytest.approx(report.oracle_auc)
    assert report.served_ctr_auc == pytest.approx(report.oracle_auc)
    assert abs(report.random_auc - 0.5) < 0.03
    assert report.served_auc > max(report.random_auc, report.frozen_auc) + 0.1
    # the frozen number is that model's own ranking of those requests
    chosen = records[10:70]
    own = rescore(frozen, store, chosen, WEIGHTS)
    expected = grouped_soft_auc((s, r["p_click"]) for (s, _), r in zip(own, chosen, strict=True))
    assert report.frozen_auc == pytest.approx(expected)


def test_without_a_frozen_snapshot_every_model_served_request_counts() -> None:
    world = World(WorldConfig(seed=4, n_users=30, n_items=100))
    records = requests(world, 20, version=1, scores="random")
    report = evaluate(records)
    assert report.requests == 20 and report.frozen_version is None
    assert math.isnan(report.frozen_auc) and math.isnan(report.frozen_ctr_auc)
    assert report.served_auc < report.oracle_auc
    assert evaluate([]).requests == 0


def test_model_served_needs_a_version_and_every_score() -> None:
    assert model_served({"model_version": 2, "scores": [0.1, 0.2]})
    assert not model_served({"model_version": None, "scores": None})
    assert not model_served({"model_version": 2, "scores": [0.1, None]})
