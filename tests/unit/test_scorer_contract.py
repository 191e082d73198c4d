"""Contract checks run over every scorer runtime (River's check_* style): torch and ONNX Runtime.

A scorer here is what the HTTP path serves: a snapshot rebuilt by ``ModelBuilder`` (safetensors +
model_args, no training code) with its runtime.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch

from feature_store.store import FeatureValue, FieldRows
from learner.features import encode_rows
from learner.models import RankingModel
from serving.scorer import LoadedModel, feature_rows
from serving.swap import ModelBuilder
from tests.serving_support import in_memory_snapshot, tiny_model

WEIGHTS = {"ctr": 1.0, "cvr": 0.5, "ysl": 0.2}
TOL = {"torch": 1e-7, "onnx": 1e-5}


@pytest.fixture(scope="module")
def reference() -> RankingModel:
    return tiny_model(seed=3)


@pytest.fixture(scope="module", params=["torch", "onnx"])
def builder(request: pytest.FixtureRequest) -> ModelBuilder:
    return ModelBuilder(runtime=request.param, weights=WEIGHTS)


@pytest.fixture(scope="module")
def scorer(builder: ModelBuilder, reference: RankingModel) -> LoadedModel:
    loaded = builder.build(in_memory_snapshot(reference))
    assert loaded.runtime.name == builder.runtime  # no silent fallback: ONNX is really tested
    return loaded


def _learner_predict(model: RankingModel, rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    cat, dense = encode_rows(model.args.features, rows).to_tensors()
    return {t: v.numpy() for t, v in model.predict(cat, dense).items()}


def _rows(n: int = 24, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "user_id": f"u{k % 3}",
            "item_id": f"i{k}",
            "user_segment": f"s{k % 4}",
            "item_category": f"c{k % 5}",
            "user_activity": float(rng.random() * 10),
            "item_price": float(rng.random() * 100),
            "item_age_h": int(rng.integers(0, 48)),
            "item_ctr_1h": float(rng.random() * 0.2),
        }
        for k in range(n)
    ]


def _close(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], tol: float) -> None:
    assert a.keys() == b.keys()
    for task in a:
        np.testing.assert_allclose(a[task], b[task], rtol=tol, atol=tol, err_msg=task)


def test_scoring_does_not_mutate_its_input(scorer: LoadedModel) -> None:
    rows = _rows()
    before = copy.deepcopy(rows)
    scorer.score(rows, WEIGHTS)
    scorer.predict_rows(rows)
    assert rows == before
    found = FieldRows(scorer.fields, [None] * len(scorer.fields), [None, [1] * len(scorer.fields)])
    context: dict[str, Any] = {"item_price": 3.0, "boost": {"i1": 2}}
    found_before, context_before = copy.deepcopy(found), copy.deepcopy(context)
    scorer.score_request("u1", ["i0", "i1"], found, context, WEIGHTS)
    assert found == found_before and context == context_before


def test_outputs_equal_the_learner_models_predict(
    scorer: LoadedModel, reference: RankingModel
) -> None:
    rows = _rows()
    _close(scorer.predict_rows(rows), _learner_predict(reference, rows), TOL[scorer.runtime.name])


def test_a_new_snapshot_of_the_same_architecture_serves_its_own_weights(
    builder: ModelBuilder, scorer: LoadedModel
) -> None:
    """ONNX re-fills the cached graph's initializers: every tensor must come from the snapshot."""
    other = tiny_model(seed=11)
    with torch.no_grad():
        other.encoder.norm.mean.add_(3.0)  # buffers too, not only parameters
    loaded = builder.build(in_memory_snapshot(other, version=7))
    rows = _rows()
    _close(loaded.predict_rows(rows), _learner_predict(other, rows), TOL[builder.runtime])
    assert not np.allclose(loaded.predict_rows(rows)["ctr"], scorer.predict_rows(rows)["ctr"])


def test_missing_features_are_tolerated(scorer: LoadedModel) -> None:
    rows: list[dict[str, Any]] = [{}, {"item_id": "i1"}, {"user_id": "u1", "item_price": None}]
    rows.append({"item_price": "not a number", "user_segment": 3.5, "item_age_h": float("inf")})
    preds = scorer.predict_rows(rows)
    for values in preds.values():
        assert values.shape == (4,) and np.isfinite(values).all()


def test_extra_features_are_ignored(scorer: LoadedModel) -> None:
    rows = _rows()
    extended = [{**r, "new_feature": 1.0, "another": "x"} for r in rows]
    _close(scorer.predict_rows(extended), scorer.predict_rows(rows), 0.0)


def test_same_input_gives_the_same_output(scorer: LoadedModel) -> None:
    rows = _rows()
    first = scorer.score(rows, WEIGHTS)
    second = scorer.score(copy.deepcopy(rows), WEIGHTS)
    assert np.array_equal(first.preds, second.preds)
    assert np.array_equal(first.scores, second.scores)


def test_rows_are_scored_independently_of_their_batch(scorer: LoadedModel) -> None:
    rows = _rows(8)
    together = scorer.predict_rows(rows)
    alone = [scorer.predict_rows([r]) for r in rows]
    for task, values in together.items():
        np.testing.assert_allclose(values, [a[task][0] for a in alone], rtol=1e-5, atol=1e-6)


def test_a_snapshot_round_trip_gives_the_same_scorer(
    builder: ModelBuilder, scorer: LoadedModel, reference: RankingModel
) -> None:
    """River's check_pickling, for safetensors: rebuilding from the same bytes changes nothing."""
    rebuilt = builder.build(in_memory_snapshot(reference, version=2))
    rows = _rows()
    _close(rebuilt.predict_rows(rows), scorer.predict_rows(rows), 0.0)
    assert rebuilt.version == 2 and rebuilt.fields == scorer.fields


def test_the_request_path_equals_the_rows_path(scorer: LoadedModel) -> None:
    width = len(scorer.fields)
    rng = np.random.default_rng(1)
    user: list[FeatureValue | None] = [
        f"s{k}" if k == 0 else float(rng.random()) for k in range(width)
    ]
    items: list[list[Any] | None] = [
        [None if rng.random() < 0.3 else float(rng.random() * 50) for _ in range(width)]
        for _ in range(10)
    ]
    items[3] = None
    found = FieldRows(scorer.fields, user, items)
    ids = [f"i{k}" for k in range(10)]
    context = {"item_age_h": 5}
    direct = scorer.score_request("u7", ids, found, context, WEIGHTS)
    via_rows = scorer.score(feature_rows(scorer.fields, "u7", ids, found, context), WEIGHTS)
    assert np.array_equal(direct.preds, via_rows.preds)
    assert np.array_equal(direct.scores, via_rows.scores)


def test_the_onnx_graph_is_exported_in_inference_form(reference: RankingModel) -> None:
    # gates.fuse stacks the expert outputs only with grad on (training); an export traced with
    # grad on would serve that slower form (ReduceSum over a Concat) without any wrong score
    from serving.runtime import OnnxExporter

    exporter = OnnxExporter()
    exporter.runtime(reference)
    (graph,) = exporter._graphs.values()
    ops = {node.op_type for node in graph.graph.node}
    assert "ReduceSum" not in ops
    assert "Gemm" in ops  # the experts and gates are there
