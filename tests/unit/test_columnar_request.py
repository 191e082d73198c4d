"""The scorer's columnar request path against the rows path it replaces, on random requests.

Both read flows are driven with the same canned Redis replies (sans-IO, no server): the columns
(:func:`read_columns_flow`) must hold what the rows (:func:`read_fields_flow`) hold, encode to the
same arrays as ``encode_rows(feature_rows(...))`` and log the same impressions.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import orjson
import pytest
import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError

from feature_store.keys import KeySpace
from feature_store.pipe import RawPipeline
from feature_store.store import (
    AsyncFeatureStore,
    FieldColumns,
    FieldRows,
    Flow,
    encode_value,
    read_columns_flow,
    read_fields_flow,
)
from learner.features import FeatureSpec, default_feature_spec, dense_value, encode_rows
from serving import scorer
from serving.features import FeatureReader, ItemCache, RedisHealth
from serving.impressions import ServedRequest, impression_records
from serving.metrics import ServingMetrics
from serving.scorer import encode_ids, encode_request, feature_rows, read_fields_for

KEYS = KeySpace("t:")
SPEC = default_feature_spec(id_buckets=1009, small_buckets=31)


def _drive(flow: Flow[Any], replies: list[Any]) -> tuple[list[Any], Any]:
    """Run a one-step flow against canned replies: its commands and its result."""
    step = list(next(flow))
    with pytest.raises(StopIteration) as stop:
        flow.send(replies)
    return step, stop.value.value


def _stored(rng: random.Random) -> bytes | None:
    """A stored hash value: JSON of any type (right or wrong for the field), or odd text."""
    choice = rng.randrange(10)
    if choice < 3:
        return None
    if choice < 6:
        value = rng.choice(
            [rng.random() * 100, rng.randrange(-5, 50), f"c{rng.randrange(6)}", "3.5", True, 2**70]
        )
        return encode_value(value).encode()
    odd = [b"typed by hand", b'"a', b'b"', b"1,2", b"", b"null", b"[1, 2]", b'{"a": 1}', b"1e400"]
    odd += [b" 4 ", b'"a,b"', b'"[x]"', b'"nullable"', b"18446744073709551616", b"-0.0"]
    return rng.choice(odd)


def _replies(rng: random.Random, width: int, n: int) -> list[list[bytes | None]]:
    """HMGET replies of the user, then of ``n`` candidates; some entities unknown."""
    replies: list[list[bytes | None]] = []
    for _ in range(n + 1):
        if rng.random() < 0.2:
            replies.append([None] * width)
        else:
            replies.append([_stored(rng) for _ in range(width)])
    return replies


def _context(rng: random.Random, fields: Sequence[str]) -> dict[str, Any]:
    context: dict[str, Any] = {f: rng.choice([1.5, "ctx", 7, None]) for f in rng.sample(fields, 2)}
    context["nested"] = {"x": 1}
    return context


def _assert_same_encoding(
    fields: tuple[str, ...],
    user: str,
    ids: list[str],
    found: FieldColumns | None,
    rows: FieldRows | None,
    context: Mapping[str, Any],
    memo: dict[str, dict[str | None, int]],
    spec: FeatureSpec = SPEC,
) -> None:
    got = encode_request(spec, fields, user, ids, found, context, memo)
    ref = encode_rows(spec, feature_rows(fields, user, ids, rows, context))
    assert np.array_equal(got.cat, ref.cat)
    assert np.array_equal(got.dense, ref.dense, equal_nan=True)
    # the scorer's order: the id buckets first (while Redis answers), the rest after the read
    early = encode_ids(spec, user, ids, memo)
    assert set(early) == {f.name for f in spec.categorical} & {"user_id", "item_id"}
    split = encode_request(spec, fields, user, ids, found, context, memo, early)
    assert np.array_equal(split.cat, ref.cat)
    assert np.array_equal(split.dense, ref.dense, equal_nan=True)


def test_the_columnar_request_path_equals_the_rows_path() -> None:
    rng = random.Random(21)
    memo: dict[str, dict[str | None, int]] = {}  # one across requests, as a served model keeps
    for trial in range(200):
        fields = read_fields_for(SPEC, ["extra"] if trial % 2 else [])
        n = rng.randrange(0, 30)
        ids = [f"i{rng.randrange(40)}" if rng.random() < 0.9 else f"new{trial}" for _ in range(n)]
        user = f"u{rng.randrange(5)}"
        replies = _replies(rng, len(fields), n)
        rows_step, rows = _drive(read_fields_flow(KEYS, user, ids, fields), replies)
        cols_step, cols = _drive(read_columns_flow(KEYS, user, ids, fields), replies)
        assert cols_step == rows_step  # the same HMGETs
        assert cols.rows() == rows
        assert (cols.size, cols.unknown) == (n, rows.items.count(None))
        context = _context(rng, fields)
        _assert_same_encoding(fields, user, ids, cols, rows, context, memo)
        assert feature_rows(fields, user, ids, cols, context) == feature_rows(
            fields, user, ids, rows, context
        )
        if trial % 9 == 0:  # Redis failed: defaults
            _assert_same_encoding(fields, user, ids, None, None, context, memo)


def test_impressions_log_the_same_features_from_columns_and_rows() -> None:
    rng = random.Random(22)
    fields = read_fields_for(SPEC, ["extra"])
    for _ in range(20):
        ids = [f"i{k}" for k in range(rng.randrange(1, 10))]
        replies = _replies(rng, len(fields), len(ids))
        _, rows = _drive(read_fields_flow(KEYS, "u1", ids, fields), replies)
        _, cols = _drive(read_columns_flow(KEYS, "u1", ids, fields), replies)
        order = rng.sample(range(len(ids)), len(ids))
        context = _context(rng, fields)
        by_rows = ServedRequest("r", "u1", 1, context, 3, fields, ids, rows, order)
        by_cols = ServedRequest("r", "u1", 1, context, 3, fields, ids, cols, order)
        assert impression_records(by_cols) == impression_records(by_rows)


def _odd_python_value(rng: random.Random) -> Any:
    """Values a FieldRows built by hand may hold: any type, huge ints, unhashable ones."""
    return rng.choice(
        [
            None,
            rng.random(),
            rng.randrange(-3, 3),
            2**53 + 1,
            2**63 + 5,
            -(2**63) - 1,
            2**70,
            10**400,  # beyond float: NaN as dense, its digits as a category
            True,
            float("inf"),
            1e39,
            "s1",
            "",
            "2.5",
            [1],
            np.float32(0.5),
        ]
    )


def test_hand_built_rows_with_odd_values_encode_alike_as_rows_and_as_columns() -> None:
    rng = random.Random(23)
    memo: dict[str, dict[str | None, int]] = {}
    fields = read_fields_for(SPEC)

    def row() -> list[Any] | None:
        return None if rng.random() < 0.2 else [_odd_python_value(rng) for _ in fields]

    for _ in range(150):
        n = rng.randrange(0, 12)
        ids = [f"i{rng.randrange(8)}" for _ in range(n)]
        rows = FieldRows(fields, row(), [row() for _ in range(n)])
        context = _context(rng, fields)
        _assert_same_encoding(fields, "u", ids, FieldColumns.from_rows(rows), rows, context, memo)
        got = encode_request(SPEC, fields, "u", ids, rows, context, memo)  # rows are taken too
        ref = encode_rows(SPEC, feature_rows(fields, "u", ids, rows, context))
        assert np.array_equal(got.cat, ref.cat)
        assert np.array_equal(got.dense, ref.dense, equal_nan=True)


def test_a_bucket_memo_that_starts_over_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scorer, "BUCKET_MEMO_SIZE", 5)
    rng = random.Random(24)
    memo: dict[str, dict[str | None, int]] = {}
    fields = read_fields_for(SPEC)
    for _ in range(50):
        ids = [f"i{rng.randrange(30)}" for _ in range(rng.randrange(1, 20))]
        replies = _replies(rng, len(fields), len(ids))
        _, rows = _drive(read_fields_flow(KEYS, "u", ids, fields), replies)
        _, cols = _drive(read_columns_flow(KEYS, "u", ids, fields), replies)
        _assert_same_encoding(fields, "u", ids, cols, rows, {}, memo)
    assert all(len(field_memo) <= 5 + 30 for field_memo in memo.values())


def test_columns_for_other_candidates_or_fields_are_refused() -> None:
    found = FieldColumns(("item_price",), None, ([1.0, 2.0],), 2, 0)
    with pytest.raises(ValueError, match="candidates"):
        encode_request(SPEC, ("item_price",), "u", ["i1"], found)
    with pytest.raises(ValueError, match="fields"):
        encode_request(SPEC, ("item_age_h",), "u", ["i1", "i2"], found)


# --- the reader ---------------------------------------------------------------------------------


class _FakePipe:
    """Answers HMGET flows from a dict of hashes as RawPipeline would, or fails as a lost Redis."""

    def __init__(self, hashes: Mapping[str, Mapping[str, bytes]]) -> None:
        self.hashes = hashes
        self.fail = False
        self.keys_read = 0

    async def run(self, flow: Flow[Any]) -> Any:
        step = next(flow)
        if self.fail:
            raise RedisConnectionError("Redis connection failed: refused")
        self.keys_read += len(step)
        replies = [[self.hashes.get(key, {}).get(f) for f in fields] for _, key, *fields in step]
        with pytest.raises(StopIteration) as stop:
            flow.send(replies)
        return stop.value.value


def _reader(pipe: _FakePipe, cache: ItemCache | None = None) -> tuple[FeatureReader, Any]:
    metrics = ServingMetrics()
    client = cast(redis.asyncio.Redis, None)  # the raw path never uses redis-py
    health = RedisHealth(client, metrics)
    health.up = True
    store = AsyncFeatureStore(client, KEYS)
    raw = cast(RawPipeline, pipe)
    return FeatureReader(store, health, metrics, "raw", raw, cache), metrics.registry


def _hashes() -> dict[str, dict[str, bytes]]:
    hashes = {KEYS.user_features("u1"): {"user_segment": b'"s2"', "user_activity": b"1.5"}}
    for k in range(10):
        hashes[KEYS.item_features(f"i{k}")] = {
            "item_category": orjson.dumps(f"c{k % 3}"),
            "item_price": str(k * 1.5).encode(),
        }
    hashes[KEYS.item_features("i3")]["item_age_h"] = b"typed by hand"
    return hashes


async def test_the_reader_gives_columns_counts_unknowns_and_defaults_on_failure() -> None:
    fields = read_fields_for(SPEC)
    ids = ["i1", "nope", "i3", "i1", "gone"]
    pipe = _FakePipe(_hashes())
    reader, registry = _reader(pipe)
    found = await reader.read("u1", ids, fields)
    assert isinstance(found, FieldColumns)
    assert found.user == ["s2", None, 1.5, None, None, None]
    assert found.items[0] == [None, "c1", None, 1.5, None, None]
    assert found.items[2] == [None, "c0", None, 4.5, "typed by hand", None]
    assert found.items[1] is None and found.items[4] is None
    unknown = {"entity": "item"}
    assert registry.get_sample_value("mtl_serve_unknown_entities_total", unknown) == 2
    assert await reader.read("u1", ids, ()) == FieldColumns((), None, (), 5, 5)
    pipe.fail = True
    assert await reader.read("u1", ids, fields) is None
    assert not reader.health.up
    assert registry.get_sample_value("mtl_serve_default_feature_requests_total") == 1


async def test_the_item_cache_gives_the_same_columns() -> None:
    fields = read_fields_for(SPEC)
    rng = random.Random(25)
    pipe = _FakePipe(_hashes())
    plain, _ = _reader(pipe)
    cached, _ = _reader(pipe, ItemCache(ttl_s=60.0))
    for _ in range(10):
        ids = [f"i{rng.randrange(12)}" for _ in range(rng.randrange(0, 15))]
        assert await cached.read("u1", ids, fields) == await plain.read("u1", ids, fields)
    await cached.read("u1", ["i1", "i2"], fields)
    before = pipe.keys_read
    assert await cached.read("u1", ["i2", "i1"], fields) == await plain.read(
        "u1", ["i2", "i1"], fields
    )
    assert pipe.keys_read == before + 1 + 3  # the user only (both items cached), then plain's


def test_dense_columns_of_plain_numbers_convert_as_dense_value() -> None:
    rng = random.Random(26)
    for _ in range(300):
        values: list[Any] = []
        for _ in range(rng.randrange(0, 20)):
            bits = rng.choice([8, 52, 53, 54, 63, 64, 65, 200, 1023, 1024, 1100])
            values.append(
                rng.choice([None, rng.random() * 1e3, rng.getrandbits(bits) * rng.choice([1, -1])])
            )
        expected = np.array([dense_value(v) for v in values], dtype=np.float64)
        assert np.array_equal(scorer._dense_column(values), expected, equal_nan=True), values
