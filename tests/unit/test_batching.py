"""Decoding samples into columns (fast path vs the stream's reference decoder) and dedupe."""

from __future__ import annotations

import copy
import hashlib
import json
import random
from typing import Any

import numpy as np
import orjson
import pytest
import torch

from learner.batching import (
    MASK_TASKS,
    Deduper,
    SampleColumns,
    check_tasks,
    decode_records,
    decode_records_naive,
    sample_hash,
)
from learner.errors import ConfigError
from learner.features import default_feature_spec, encode_rows

SPEC = default_feature_spec(id_buckets=1024, small_buckets=64)


def sample(i: int, **changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sample_id": f"imp-{i}",
        "user_id": f"u{i % 7}",
        "item_id": f"i{i % 11}",
        "features": {
            "user_id": f"u{i % 7}",
            "item_id": f"i{i % 11}",
            "user_segment": f"s{i % 3}",
            "item_price": 1.5 * i,
            "item_age_h": i,
            "unknown_feature": "ignored",
        },
        "ts": 1_700_000_000_000 + i,
        "labels": {"click": i % 2, "conversion": (i % 4 == 1) * 1, "ysl": (i % 4 == 1) * 2},
        "masks": {"ctr": 1, "cvr": i % 2, "ctcvr": 1, "ysl": i % 2},
        "kind": "final",
        "revision": 0,
        "elapsed_ms": 1000,
        "emitted_at": 1_700_000_100_000 + i,
    }
    base.update(changes)
    return base


def _without(obj: dict[str, Any], *path: str) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    target = out
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return out


def _with(obj: dict[str, Any], value: Any, *path: str) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    target = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return out


def corpus(seed: int = 0) -> list[bytes | None]:
    """Valid samples interleaved with every kind of breakage, in a shuffled order."""
    good = sample(1)
    fields = [
        ("sample_id",),
        ("user_id",),
        ("item_id",),
        ("ts",),
        ("labels",),
        ("masks",),
        ("kind",),
        ("revision",),
        ("elapsed_ms",),
        ("emitted_at",),
        ("labels", "click"),
        ("labels", "conversion"),
        ("labels", "ysl"),
        ("masks", "ctr"),
        ("masks", "cvr"),
        ("masks", "ctcvr"),
        ("masks", "ysl"),
    ]
    bad_values: list[Any] = [None, True, "1", 1.0, [], {}, -1, 2, "", "x" * 70_000]
    broken = [_without(good, *path) for path in fields]
    broken += [_with(good, v, *path) for path in fields for v in bad_values]
    broken += [
        _with(good, {"nested": {"a": 1}}, "features"),
        _with(good, [1, 2], "features"),
        _with(good, None, "features"),  # valid: no features
        _with(good, "later", "kind"),
        _with(good, ["final"], "kind"),  # unhashable
        _with(good, "early", "kind"),
        _with(good, "correction", "kind"),
        {**good, "brand_new_field": 1},  # unknown top-level fields are tolerated
    ]
    raws: list[bytes | None] = [orjson.dumps(o) for o in broken]
    raws += [orjson.dumps(sample(i)) for i in range(40)]
    raws += [b"{not json", b"", b"[]", b"null", b"42", b'"text"', None]
    raws.append(json.dumps(sample(99, features={"item_price": float("nan")})).encode())
    random.Random(seed).shuffle(raws)
    return raws


def _assert_same(a: SampleColumns, b: SampleColumns) -> None:
    assert a.bad == b.bad
    for name in ("cat", "labels", "masks", "fnw", "hashes", "emitted_at"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_array_equal(np.isnan(a.dense), np.isnan(b.dense))
    np.testing.assert_array_equal(np.nan_to_num(a.dense), np.nan_to_num(b.dense))


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_decoder_matches_the_reference_decoder(seed: int) -> None:
    raws = corpus(seed)
    fast = decode_records(raws, SPEC)
    naive = decode_records_naive(raws, SPEC)
    _assert_same(fast, naive)
    assert len(fast) + sum(fast.bad.values()) == len(raws)
    assert len(fast) > 40  # the 40 plain samples plus the valid variants


def test_bad_records_are_counted_by_reason() -> None:
    raws: list[bytes | None] = [
        orjson.dumps(sample(1)),
        b"{oops",
        json.dumps(sample(2, features={"item_price": float("nan")})).encode(),  # NaN is not JSON
        orjson.dumps(_without(sample(3), "ts")),
        orjson.dumps(_with(sample(4), "7", "ts")),
        orjson.dumps(_with(sample(5), 3, "labels", "click")),
        orjson.dumps(_with(sample(6), -1, "labels", "ysl")),
        orjson.dumps(_with(sample(7), 2, "masks", "cvr")),
        orjson.dumps(_with(sample(8), True, "masks", "cvr")),
        None,
    ]
    cols = decode_records(raws, SPEC)
    assert len(cols) == 1
    assert dict(cols.bad) == {
        "invalid_json": 2,
        "missing:ts": 1,
        "bad_type:ts": 1,
        "bad_value:labels.click": 1,
        "bad_value:labels.ysl": 1,
        "bad_value:masks": 1,
        "bad_type:cvr": 1,
        "empty": 1,
    }


def test_columns_hold_the_sample_values() -> None:
    objs = [sample(i) for i in range(6)]
    objs[2] = sample(2, kind="early")
    objs[3] = sample(3, kind="correction", revision=1, sample_id="imp-3#1")
    cols = decode_records([orjson.dumps(o) for o in objs], SPEC)
    expected = encode_rows(SPEC, [o["features"] for o in objs])
    np.testing.assert_array_equal(cols.cat, expected.cat)
    np.testing.assert_array_equal(cols.dense, expected.dense)
    labels = [[o["labels"][k] for k in ("click", "conversion", "ysl")] for o in objs]
    np.testing.assert_array_equal(cols.labels, np.array(labels, dtype=np.float32))
    np.testing.assert_array_equal(
        cols.masks, np.array([[o["masks"][t] for t in MASK_TASKS] for o in objs], np.float32)
    )
    np.testing.assert_array_equal(cols.fnw, [0, 0, 1, 1, 0, 0])
    assert cols.hashes.tolist() == [sample_hash(o["sample_id"]) for o in objs]
    assert cols.emitted_at.tolist() == [o["emitted_at"] for o in objs]


def test_sample_hash_is_blake2b_64() -> None:
    digest = hashlib.blake2b(b"imp-9#2", digest_size=8).digest()
    assert sample_hash("imp-9#2") == int.from_bytes(digest, "little")


def test_train_batch_targets_map_labels_and_the_samples_own_masks() -> None:
    objs = [sample(i) for i in range(8)]
    objs[0] = sample(0, masks={"ctr": 1, "cvr": 0, "ctcvr": 1, "ysl": 1})  # ysl space "all"
    batch = decode_records([orjson.dumps(o) for o in objs], SPEC).to_batch()
    targets = batch.targets(("ctr", "cvr", "ctcvr", "ysl"))
    click = torch.tensor([o["labels"]["click"] for o in objs], dtype=torch.float32)
    conversion = torch.tensor([o["labels"]["conversion"] for o in objs], dtype=torch.float32)
    assert torch.equal(targets.labels["ctcvr"], click * conversion)
    assert torch.equal(targets.labels["cvr"], conversion)
    assert targets.masks["ysl"].tolist() == [o["masks"]["ysl"] for o in objs]
    assert targets.masks["ysl"][0] == 1  # taken from the sample, not derived from the click
    assert set(batch.targets(("ctr",)).labels) == {"ctr"}


def test_check_tasks_rejects_tasks_without_labels() -> None:
    check_tasks(("ctr", "ysl"))
    with pytest.raises(ConfigError, match="dwell"):
        check_tasks(("ctr", "dwell"))


def _hashes(ids: list[str]) -> np.ndarray[Any, np.dtype[np.uint64]]:
    return np.array([sample_hash(i) for i in ids], dtype=np.uint64)


def test_deduper_drops_repeats_within_and_across_batches() -> None:
    dedupe = Deduper(horizon=100)
    assert dedupe.filter(_hashes(["a", "b", "a"])).tolist() == [True, True, False]
    assert dedupe.filter(_hashes(["b", "c"])).tolist() == [False, True]
    assert (dedupe.passed, dedupe.dropped, len(dedupe)) == (3, 2, 3)
    assert dedupe.checksum == sum(sample_hash(i) for i in "abc") % 2**64


def test_deduper_forgets_ids_beyond_the_horizon() -> None:
    dedupe = Deduper(horizon=3)
    dedupe.filter(_hashes(["a", "b", "c"]))
    assert dedupe.filter(_hashes(["a"])).tolist() == [False]  # still within 3 distinct ids
    dedupe.filter(_hashes(["d"]))  # evicts "a", the oldest
    assert dedupe.filter(_hashes(["a", "c"])).tolist() == [True, False]
    assert Deduper(horizon=0).filter(_hashes(["x", "x"])).tolist() == [True, True]


def test_deduper_state_round_trip_keeps_behaviour() -> None:
    ids = [f"s{i}" for i in range(50)]
    dedupe = Deduper(horizon=20)
    dedupe.filter(_hashes(ids))
    hashes, counters = dedupe.state()
    restored = Deduper(horizon=20)
    restored.load_state(hashes, counters)
    probe = _hashes(["s0", "s29", "s30", "s49", "new"])
    first = restored.filter(probe).tolist()
    assert first == dedupe.filter(probe).tolist() == [True, True, False, False, True]
    assert restored.checksum == dedupe.checksum
    # s0, s29 and "new" pushed the three oldest (s30, s31, s32) out of the 20-id horizon
    assert restored.filter(probe).tolist() == [False, False, True, False, False]
    smaller = Deduper(horizon=5)
    smaller.load_state(hashes, counters)
    assert smaller.filter(_hashes(["s44", "s45"])).tolist() == [True, False]
