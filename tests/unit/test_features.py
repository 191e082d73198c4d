"""Feature spec, stable hashing, row encoding and the input encoder."""

from __future__ import annotations

import json
import logging
import math
import random
import time

import numpy as np
import pytest
import torch

from learner.errors import ConfigError, InputShapeError
from learner.features import (
    CategoricalField,
    FeatureSpec,
    InputEncoder,
    RunningNorm,
    default_feature_spec,
    encode_rows,
    hash_bucket,
)

logger = logging.getLogger(__name__)

SPEC = FeatureSpec(
    categorical=[CategoricalField("user_id", 1024, 4), CategoricalField("item_id", 64, 3)],
    dense=["price", "age"],
)


def test_hash_bucket_is_stable_across_versions() -> None:
    # Literals computed once: a change here silently remaps every stored snapshot's embeddings.
    assert hash_bucket("user_id", "u1", 2**18) == 139354
    assert hash_bucket("item_id", 42, 2**18) == 191569
    assert hash_bucket("user_segment", "s3", 1024) == 655
    assert hash_bucket("item_category", "c7", 1024) == 375


def test_hash_bucket_separates_fields_and_reserves_zero() -> None:
    assert hash_bucket("user_id", "x", 2**18) != hash_bucket("item_id", "x", 2**18)
    buckets = {hash_bucket("item_id", f"i{i}", 16) for i in range(2000)}
    assert buckets == set(range(1, 16))  # every non-missing bucket is used, never 0


@pytest.mark.parametrize(
    "value",
    [None, "", float("nan"), float("inf"), [1, 2], {"a": 1}, object(), 10**5000],
    ids=["none", "empty", "nan", "inf", "list", "dict", "object", "huge_int"],
)
def test_hash_bucket_missing_or_garbage_is_bucket_zero(value: object) -> None:
    assert hash_bucket("item_id", value, 1024) == 0


def test_hash_bucket_numbers_and_strings_agree() -> None:
    expected = hash_bucket("item_id", "42", 1024)
    assert hash_bucket("item_id", 42, 1024) == expected
    assert hash_bucket("item_id", 42.0, 1024) == expected
    assert hash_bucket("item_id", np.int64(42), 1024) == expected
    assert hash_bucket("item_id", b"42", 1024) == expected
    assert hash_bucket("item_id", 42.5, 1024) != expected


def test_hash_bucket_rejects_too_few_buckets() -> None:
    with pytest.raises(ValueError, match="buckets"):
        hash_bucket("item_id", "a", 1)


def test_feature_spec_json_round_trip() -> None:
    spec = default_feature_spec(id_buckets=2**10)
    again = FeatureSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec


@pytest.mark.parametrize(
    "data",
    [
        {"categorical": [], "dense": ["a", "a"]},
        {"categorical": [{"name": "a", "buckets": 1, "dim": 4}], "dense": []},
        {"categorical": [{"name": "a", "buckets": 8}], "dense": []},
        {"categorical": [], "dense": [], "extra": 1},
    ],
)
def test_feature_spec_rejects_bad_dicts(data: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        FeatureSpec.from_dict(data)


def test_encode_rows_tolerates_missing_extra_and_garbage() -> None:
    rows: list[object] = [
        {"user_id": "u1", "item_id": 7, "price": 9.5, "age": 3, "unknown": "x"},
        {"price": None, "age": "2.5"},  # missing categoricals, numeric string
        {"user_id": None, "item_id": [1], "price": float("inf"), "age": "abc"},
        {"user_id": {"x": 1}, "price": 1e300, "age": 10**400},  # beyond float32 / float
        {"price": np.float32(1.5), "age": True},
        None,  # not a mapping at all
        42,
    ]
    enc = encode_rows(SPEC, rows)  # type: ignore[arg-type]  # untrusted input on purpose
    assert enc.cat.dtype == np.int64 and enc.cat.shape == (7, 2)
    assert enc.dense.dtype == np.float32 and enc.dense.shape == (7, 2)
    assert enc.cat[0].tolist() == [
        hash_bucket("user_id", "u1", 1024),
        hash_bucket("item_id", 7, 64),
    ]
    assert enc.cat[1:].tolist() == [[0, 0]] * 6
    assert enc.dense[0].tolist() == [9.5, 3.0]
    assert math.isnan(enc.dense[1, 0]) and enc.dense[1, 1] == 2.5
    assert np.isnan(enc.dense[2:4]).all()
    assert enc.dense[4].tolist() == [1.5, 1.0]
    assert np.isnan(enc.dense[5:]).all()


def test_encode_rows_empty_batch() -> None:
    enc = encode_rows(SPEC, [])
    assert enc.cat.shape == (0, 2) and enc.dense.shape == (0, 2)
    cat, dense = enc.to_tensors()
    assert cat.dtype == torch.int64 and dense.dtype == torch.float32


def _random_rows(n: int, seed: int) -> list[dict[str, object]]:
    rng = random.Random(seed)
    return [
        {
            "user_id": f"u{rng.randrange(10**6)}",
            "item_id": f"i{rng.randrange(10**5)}",
            "user_segment": f"s{rng.randrange(8)}",
            "item_category": f"c{rng.randrange(30)}",
            "user_activity": rng.random(),
            "item_price": rng.random() * 100,
            "item_age_h": rng.randrange(500),
            "item_ctr_1h": None if rng.random() < 0.2 else rng.random(),
        }
        for _ in range(n)
    ]


def test_encode_rows_matches_per_cell_reference_and_logs_throughput() -> None:
    spec = default_feature_spec()
    rows = _random_rows(20_000, seed=0)
    start = time.perf_counter()
    enc = encode_rows(spec, rows)
    elapsed = time.perf_counter() - start
    logger.info("encode_rows: %.0f rows/s (20k rows, mostly unseen ids)", len(rows) / elapsed)
    start = time.perf_counter()
    encode_rows(spec, rows[:500])
    logger.info("encode_rows: 500 candidates in %.2f ms", (time.perf_counter() - start) * 1e3)
    for i in (0, 1, 9_999, 19_999):
        row = rows[i]
        expected_cat = [hash_bucket(f.name, row[f.name], f.buckets) for f in spec.categorical]
        assert enc.cat[i].tolist() == expected_cat
        expected_dense = [np.nan if row[n] is None else row[n] for n in spec.dense]
        np.testing.assert_array_equal(enc.dense[i], np.array(expected_dense, dtype=np.float32))


def test_running_norm_matches_nan_aware_reference() -> None:
    torch.manual_seed(0)
    norm = RunningNorm(3)
    batches = [torch.randn(n, 3) * torch.tensor([1.0, 10.0, 0.1]) + 5.0 for n in (7, 50, 1, 33)]
    for b in batches:
        b[torch.rand_like(b) < 0.3] = float("nan")
        norm(b)
    data = torch.cat(batches).double().numpy()
    np.testing.assert_allclose(norm.count.numpy(), (~np.isnan(data)).sum(0))
    np.testing.assert_allclose(norm.mean.numpy(), np.nanmean(data, 0), rtol=1e-10)
    np.testing.assert_allclose(norm.var.numpy(), np.nanvar(data, 0), rtol=1e-10)


def test_running_norm_eval_freezes_stats_and_zeroes_missing() -> None:
    norm = RunningNorm(2, clip=3.0)
    norm(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    state = {k: v.clone() for k, v in norm.state_dict().items()}
    assert set(state) == {"count", "mean", "var"}
    norm.eval()
    out = norm(torch.tensor([[float("nan"), 3.0], [2.0, 1000.0]]))
    for k, v in norm.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert out[0, 0] == 0.0 and out[1, 0] == 0.0  # NaN -> 0; the mean -> 0
    assert out[0, 1] == 0.0 and out[1, 1] == 3.0  # clipped


def test_running_norm_max_count_tracks_drift() -> None:
    capped, plain = RunningNorm(1, max_count=100.0), RunningNorm(1)
    for level in (0.0, 10.0):
        for _ in range(20):
            batch = torch.full((100, 1), level)
            capped(batch)
            plain(batch)
    assert float(capped.mean) > 9.9  # old level forgotten
    assert abs(float(plain.mean) - 5.0) < 1e-9  # the all-time mean


def test_input_encoder_shapes_and_missing_indicator() -> None:
    enc = encode_rows(SPEC, [{"user_id": "u", "price": 1.0}, {"age": 2.0}])
    cat, dense = enc.to_tensors()
    with_ind = InputEncoder(SPEC, missing_indicator=True)
    without = InputEncoder(SPEC, missing_indicator=False)
    out = with_ind(cat, dense)
    assert out.shape == (2, with_ind.out_dim) == (2, 4 + 3 + 2 + 2)
    assert without(cat, dense).shape == (2, 4 + 3 + 2)
    assert out[:, -2:].tolist() == [[0.0, 1.0], [1.0, 0.0]]
    assert torch.isfinite(out).all()


def test_input_encoder_rejects_wrong_shapes() -> None:
    encoder = InputEncoder(SPEC)
    with pytest.raises(InputShapeError):
        encoder(torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 2))
    with pytest.raises(InputShapeError):
        encoder(torch.zeros(4, 2, dtype=torch.long), torch.zeros(5, 2))
