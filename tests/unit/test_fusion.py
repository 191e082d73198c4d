"""Fusion (PLE eq. 1), context boosts, ranking order and the columnar request encoder."""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import pytest

from feature_store.store import FieldRows
from learner.features import default_feature_spec, encode_rows
from mtlstream.errors import SettingsError
from serving.errors import IncompatibleSnapshotError, RequestError
from serving.scorer import (
    MIN_PROBABILITY,
    ScoredBatch,
    check_fusion,
    context_boost,
    encode_request,
    feature_rows,
    fuse,
    rank_items,
    read_fields_for,
)
from serving.settings import ServingSettings, from_env, parse_weights

KINDS = {"ctr": "binary", "cvr": "binary", "ctcvr": "binary", "ysl": "count"}


def test_fuse_is_the_weighted_product_of_positive_task_scores() -> None:
    rng = np.random.default_rng(0)
    preds = {
        "ctr": rng.random(50),
        "cvr": rng.random(50),
        "ctcvr": rng.random(50),
        "ysl": rng.random(50) * 5,
    }
    weights = {"ctr": 1.0, "cvr": 0.5, "ysl": 0.2}
    boost = rng.random(50) + 0.5
    got = fuse(preds, KINDS, weights, boost)
    for i in range(50):
        expected = (
            preds["ctr"][i] ** 1.0
            * preds["cvr"][i] ** 0.5
            * (1 + preds["ysl"][i]) ** 0.2
            * boost[i]
        )
        assert got[i] == pytest.approx(expected, rel=1e-12)


def test_fuse_clips_probabilities_and_never_lets_a_count_zero_the_score() -> None:
    preds = {"ctr": np.array([0.0, 1.0, 0.5]), "ysl": np.array([-3.0, 0.0, 2.0])}
    got = fuse(preds, KINDS, {"ctr": 1.0, "ysl": 1.0})
    assert got.tolist() == pytest.approx([MIN_PROBABILITY * 1.0, 1.0, 0.5 * 3.0])


def test_zero_weights_drop_a_task_and_no_weights_give_ones() -> None:
    preds = {"ctr": np.array([0.2, 0.4])}
    assert fuse(preds, KINDS, {"ctr": 0.0, "unknown": 0.0}).tolist() == [1.0, 1.0]
    assert fuse(preds, KINDS, {}).tolist() == [1.0, 1.0]


def test_weights_on_a_task_the_model_lacks_name_both_sides() -> None:
    with pytest.raises(IncompatibleSnapshotError, match=r"\['dwell'\].*\['ctr'"):
        check_fusion({"ctr": 1.0, "dwell": 0.3}, {"ctr": "binary"})


def test_parse_weights_accepts_spaces_and_rejects_garbage() -> None:
    assert parse_weights(" ctr=1 , cvr = 0.5,ysl=0.2,") == {"ctr": 1.0, "cvr": 0.5, "ysl": 0.2}
    for bad in ("ctr", "ctr=x", "=1", "ctr=1,ctr=2", "ctr=nan", "ctr=inf"):
        with pytest.raises(SettingsError):
            parse_weights(bad)


def test_settings_fail_at_start_on_a_bad_value() -> None:
    assert from_env(ServingSettings, {"MTL_FUSION_WEIGHTS": "ctr=2"}).fusion == {"ctr": 2.0}
    with pytest.raises(SettingsError, match="fusion weight"):
        from_env(ServingSettings, {"MTL_FUSION_WEIGHTS": "ctr=oops"})
    with pytest.raises(SettingsError, match="MTL_SERVE_RUNTIME"):
        from_env(ServingSettings, {"MTL_SERVE_RUNTIME": "tensorrt"})


def test_context_boost_number_object_or_absent() -> None:
    ids = ["a", "b", "c"]
    assert context_boost({}, ids, "boost") is None
    assert context_boost({"boost": 2}, ids, "") is None
    same = context_boost({"boost": 1.5}, ids, "boost")
    assert same is not None and same.tolist() == [1.5, 1.5, 1.5]
    boost = context_boost({"boost": {"b": 3, "zzz": 9}}, ids, "boost")
    assert boost is not None and boost.tolist() == [1.0, 3.0, 1.0]


@pytest.mark.parametrize("bad", [0, -1, math.inf, "2", True, None, [2], {"a": 0}, {"a": "x"}])
def test_a_bad_boost_is_a_422(bad: object) -> None:
    with pytest.raises(RequestError) as info:
        context_boost({"boost": bad}, ["a"], "boost")
    assert info.value.status == 422 and info.value.code == "invalid_boost"


def test_rank_items_orders_by_score_ties_keep_request_order_and_top_k_cuts() -> None:
    scores = np.array([0.2, 0.9, 0.2, 0.5])
    preds = np.array([[0.1, 1.0], [0.2, 2.0], [0.3, 3.0], [0.4, 4.0]], dtype=np.float32)
    scored = ScoredBatch(("ctr", "ysl"), preds, scores)
    order, items = rank_items(["a", "b", "c", "d"], scored)
    assert order == [1, 3, 0, 2]
    assert [i["item_id"] for i in items] == ["b", "d", "a", "c"]
    assert items[0]["tasks"] == {"ctr": pytest.approx(0.2), "ysl": 2.0}
    assert items[0]["score"] == 0.9
    for i, item in zip(order, items, strict=True):  # every item its own row, tasks in order
        assert list(item["tasks"]) == ["ctr", "ysl"]
        assert item["tasks"] == dict(zip(("ctr", "ysl"), preds[i].tolist(), strict=True))
    order, items = rank_items(["a", "b", "c", "d"], scored, top_k=2)
    assert order == [1, 3] and len(items) == 2
    assert rank_items(["a", "b", "c", "d"], scored, top_k=10)[0] == [1, 3, 0, 2]


def test_feature_rows_precedence_context_user_item_ids() -> None:
    fields = ("seg", "price", "user_id")
    found = FieldRows(fields, ["s1", 1.0, "spoofed"], [["s9", None, None], None])
    context = {"price": 7.0, "seg": "ctx", "other": 1, "user_id": "ctx-user"}
    rows = feature_rows(fields, "u1", ["a", "b"], found, context)
    assert rows[0] == {"seg": "s9", "price": 1.0, "user_id": "u1", "item_id": "a"}
    assert rows[1] == {"seg": "s1", "price": 1.0, "user_id": "u1", "item_id": "b"}
    # Redis away: context (only named fields) and ids remain
    assert feature_rows(fields, "u1", ["a"], None, context) == [
        {"seg": "ctx", "price": 7.0, "user_id": "u1", "item_id": "a"}
    ]


def test_read_fields_skip_ids_and_metadata_and_keep_order() -> None:
    fields = read_fields_for(default_feature_spec(), ["promo", "item_price", "_ts", "user_id"])
    assert fields[:2] == ("user_segment", "item_category")
    assert fields[-1] == "promo" and len(set(fields)) == len(fields)
    assert "user_id" not in fields and "_ts" not in fields


def _random_value(rng: random.Random) -> Any:
    choice = rng.randrange(12)
    values: list[Any] = [
        None,
        rng.random() * 100,
        rng.randrange(-5, 50),
        f"c{rng.randrange(5)}",
        "3.5",
        "not-a-number",
        True,
        False,
        1e39,  # beyond float32: missing
        float("nan"),
        -0.0,
        "",
    ]
    return values[choice]


def test_encode_request_equals_encode_rows_of_feature_rows_on_random_requests() -> None:
    """The scorer's columnar encoder against the reference (dict rows -> encode_rows)."""
    spec = default_feature_spec(id_buckets=1009, small_buckets=31)
    rng = random.Random(7)
    for trial in range(60):
        fields = read_fields_for(spec, ["extra"] if trial % 2 else [])
        n = rng.randrange(1, 40)
        ids = [f"i{rng.randrange(30)}" for _ in range(n)]

        def row(width: int) -> list[Any] | None:
            if rng.random() < 0.15:
                return None
            return [_random_value(rng) for _ in range(width)]

        width = len(fields)
        found = (
            None
            if trial % 7 == 0
            else FieldRows(fields, row(width), [row(width) for _ in range(n)])
        )
        context = {f: _random_value(rng) for f in rng.sample(fields, k=2)}
        context["nested"] = {"x": 1}
        got = encode_request(spec, fields, f"u{trial}", ids, found, context)
        ref = encode_rows(spec, feature_rows(fields, f"u{trial}", ids, found, context))
        assert np.array_equal(got.cat, ref.cat), trial
        assert np.array_equal(got.dense, ref.dense, equal_nan=True), trial


def test_encode_request_rejects_rows_read_for_other_fields() -> None:
    spec = default_feature_spec()
    found = FieldRows(("item_price",), None, [None])
    with pytest.raises(ValueError, match="fields"):
        encode_request(spec, ("item_age_h",), "u", ["i"], found)
