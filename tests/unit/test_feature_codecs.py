"""Pure feature_store logic without Redis: feature encoding, snapshot metadata, counter math."""

from __future__ import annotations

import pickle
import random
from collections.abc import Generator, Sequence
from typing import Any

import numpy as np
import pytest
import redis.asyncio
import safetensors.numpy

from feature_store.counters import (
    CounterSettings,
    WindowTotals,
    bucket_field,
    bucket_start,
    count_batch,
    counter_client,
    counter_flow,
    decode_buckets,
    smoothed_ctr,
    window_totals,
)
from feature_store.errors import (
    CorruptSnapshotError,
    InvalidFeatureError,
    SnapshotNotFoundError,
)
from feature_store.keys import KeySpace
from feature_store.pipe import RawPipeline
from feature_store.registry import (
    check_safetensors,
    decode_meta,
    encode_meta,
    load_flow,
    snapshot_from_parts,
    versions_to_prune,
)
from feature_store.store import (
    MERGE_NEWEST,
    FeatureRow,
    Flow,
    decode_row,
    decode_value,
    encode_features,
    encode_value,
    merge_command,
    run_flow,
)

# --- features -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", [0, -3, 2**40, 0.1, -1.5e-12, 1e300, "s3", "3", "", 'ünï "quoted"', True, False]
)
def test_feature_values_round_trip_with_their_type(value: bool | int | float | str) -> None:
    decoded = decode_value(encode_value(value).encode())
    assert decoded == value
    assert type(decoded) is type(value)


def test_numpy_scalars_are_stored_as_plain_numbers() -> None:
    assert decode_value(encode_value(np.float32(0.5)).encode()) == 0.5
    assert decode_value(encode_value(np.int64(7)).encode()) == 7


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None, [1], {"a": 1}, b"x"])
def test_unstorable_values_are_rejected(bad: object) -> None:
    with pytest.raises(InvalidFeatureError):
        encode_value(bad, "f")


@pytest.mark.parametrize("name", ["", "_ts", "_private", 3])
def test_reserved_or_empty_feature_names_are_rejected(name: Any) -> None:
    with pytest.raises(InvalidFeatureError):
        encode_features({name: 1.0})


def test_hand_written_values_that_are_not_json_stay_text() -> None:
    assert decode_value(b"s3") == "s3"
    assert decode_value("c7") == "c7"
    assert decode_value(b"[1, 2]") == "[1, 2]"
    assert decode_value(b"null") == "null"


def test_decode_row_skips_metadata_and_reads_ts() -> None:
    raw = {b"a": b"1", b"b": b'"x"', b"_ts": b"1700", b"_ts:counters": b"99"}
    assert decode_row(raw) == FeatureRow({"a": 1, "b": "x"}, 1700)
    assert decode_row({}) is None
    assert decode_row({"a": "2.5"}) == FeatureRow({"a": 2.5}, None)


def test_merge_command_layout() -> None:
    cmd = merge_command("k", {"a": "1"}, 5, ttl_s=60)
    assert cmd == ("EVALSHA", MERGE_NEWEST.sha, 1, "k", "_ts", 5, 60, "a", "1")
    assert merge_command("k", {}, 5)[4:] == ("_ts", 5, 0)
    for ts in (-1, 1.5, True):
        with pytest.raises(ValueError):
            merge_command("k", {}, ts)  # type: ignore[arg-type]  # runtime check under test
    with pytest.raises(ValueError):
        merge_command("k", {}, 1, ttl_s=0)


class _ScriptedClient:
    """Stands in for redis.Redis in run_flow: answers each step from a list of canned replies."""

    def __init__(self, replies: list[list[Any]]) -> None:
        self.replies = replies
        self.steps: list[list[tuple[Any, ...]]] = []


def test_run_flow_sends_each_step_and_returns_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    client = _ScriptedClient([[b"1", None], [3]])

    def fake_execute(c: _ScriptedClient, step: list[tuple[Any, ...]]) -> list[Any]:
        c.steps.append(step)
        return c.replies[len(c.steps) - 1]

    monkeypatch.setattr("feature_store.store.execute_step", fake_execute)

    def flow() -> Generator[list[tuple[Any, ...]], list[Any], int]:
        first = yield [("GET", "a"), ("GET", "b")]
        (second,) = yield [("INCR", str(len(first)))]
        return int(second) * 10

    assert run_flow(client, flow()) == 30  # type: ignore[arg-type]  # a stand-in client
    assert client.steps == [[("GET", "a"), ("GET", "b")], [("INCR", "2")]]


# --- snapshots ----------------------------------------------------------------------------------


def _blob(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return safetensors.numpy.save({"w": rng.standard_normal((3, 4)).astype(np.float32)})


def test_safetensors_accepted_and_pickle_rejected() -> None:
    check_safetensors(_blob())
    for bad in (pickle.dumps({"w": [1.0]}), b"", b"\x02\x00\x00\x00\x00\x00\x00\x00[]", "text"):
        with pytest.raises(ValueError):
            check_safetensors(bad)  # type: ignore[arg-type]  # str is one of the bad inputs


def test_meta_round_trips_as_json_and_registry_fields_are_added() -> None:
    meta = {"model_args": {"n_experts": 2}, "step": 10, "metrics": {"auc": float("nan")}}
    fields = encode_meta({**meta, "offsets": {0: np.int64(5)}}, _blob(), 4, 1234)
    decoded = decode_meta(fields)
    assert decoded["model_args"] == {"n_experts": 2}
    assert decoded["metrics"] == {"auc": None}  # JSON has no NaN
    assert decoded["offsets"] == {"0": 5}
    assert (decoded["version"], decoded["created_at"]) == (4, 1234)
    assert len(decoded["sha256"]) == 64
    with pytest.raises(ValueError, match="set by the registry"):
        encode_meta({"sha256": "x"}, _blob(), 1, 0)
    with pytest.raises(ValueError, match="JSON"):
        encode_meta({"bad": object()}, _blob(), 1, 0)


def test_snapshot_parts_are_checked() -> None:
    blob = _blob()
    fields = encode_meta({"step": 1}, blob, 2, 0)
    assert snapshot_from_parts("ple", 2, blob, fields).weights == blob
    with pytest.raises(CorruptSnapshotError, match="sha256"):
        snapshot_from_parts("ple", 2, _blob(seed=1), fields)
    with pytest.raises(CorruptSnapshotError, match="blob is missing"):
        snapshot_from_parts("ple", 2, None, fields)
    with pytest.raises(CorruptSnapshotError, match="metadata is missing"):
        snapshot_from_parts("ple", 2, blob, {})
    with pytest.raises(CorruptSnapshotError, match="version"):
        snapshot_from_parts("ple", 3, blob, fields)
    with pytest.raises(SnapshotNotFoundError):
        snapshot_from_parts("ple", 2, None, {})


@pytest.mark.parametrize(
    ("versions", "latest", "keep", "expected"),
    [
        ([1, 2, 3, 4, 5], 5, 3, [1, 2]),
        ([1, 2, 3, 4, 5], 1, 3, [2]),
        ([3, 1, 2], 3, 5, []),
        ([1, 2, 3], None, 1, [1, 2]),
        ([], None, 2, []),
    ],
)
def test_versions_to_prune_keeps_newest_and_latest(
    versions: list[int], latest: int | None, keep: int, expected: list[int]
) -> None:
    assert versions_to_prune(versions, latest, keep) == expected


# --- counters -----------------------------------------------------------------------------------


def test_bucket_math() -> None:
    assert [bucket_start(t, 60_000) for t in (0, 59_999, 60_000, 61_000)] == [0, 0, 60_000, 60_000]
    assert bucket_field("impression", 60_000) == "imp:60000"
    assert bucket_field("click", 0) == "clk:0"
    with pytest.raises(ValueError):
        bucket_field("view", 0)


def test_counter_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        CounterSettings(window_ms=90_000, bucket_ms=60_000)
    with pytest.raises(ValueError):
        CounterSettings(bucket_ms=0)
    with pytest.raises(ValueError):
        CounterSettings(prior_impressions=0)
    with pytest.raises(InvalidFeatureError):
        CounterSettings(ctr_field="_ctr")


def test_smoothed_ctr_shrinks_to_the_prior_and_is_capped() -> None:
    settings = CounterSettings(prior_clicks=1.0, prior_impressions=20.0)
    assert smoothed_ctr(0, 0, settings) == pytest.approx(0.05)
    assert smoothed_ctr(1000, 100, settings) == pytest.approx(101 / 1020)
    assert smoothed_ctr(0, 500, settings) == 1.0


def test_count_batch_skips_events_outside_the_batch_window() -> None:
    settings = CounterSettings(window_ms=300_000, bucket_ms=60_000)
    events = [("a", "impression", 1_000_000), ("a", "click", 1_000_500), ("b", "impression", 10)]
    increments, anchor = count_batch(events, settings)
    assert anchor == 960_000
    # "b" is mentioned, so its window slides to the anchor, but its one event is too old to count
    assert increments == {"a": {"imp:960000": 1, "clk:960000": 1}, "b": {}}
    assert count_batch([], settings) == ({}, 0)
    with pytest.raises(ValueError):
        count_batch([("a", "impression", -5)], settings)


def test_window_totals_match_a_naive_sum() -> None:
    rng = random.Random(7)
    settings = CounterSettings(window_ms=600_000, bucket_ms=60_000)
    for _ in range(200):
        buckets = {
            bucket_field(
                rng.choice(["impression", "click"]), 60_000 * rng.randrange(40)
            ): rng.randrange(1, 9)
            for _ in range(rng.randrange(0, 30))
        }
        buckets["junk"] = 3
        anchor = 60_000 * rng.randrange(45)
        totals, stale = window_totals(buckets, anchor, settings)
        newest = max([anchor] + [int(k.split(":")[1]) for k in buckets if ":" in k])
        inside = {
            k: v for k, v in buckets.items() if ":" in k and newest - 600_000 < int(k.split(":")[1])
        }
        assert totals.anchor_ms == newest
        assert totals.impressions == sum(v for k, v in inside.items() if k.startswith("imp:"))
        assert totals.clicks == sum(v for k, v in inside.items() if k.startswith("clk:"))
        assert sorted(stale) == sorted(set(buckets) - set(inside))
        assert totals.ctr == smoothed_ctr(totals.impressions, totals.clicks, settings)


def test_decode_buckets_reads_a_mapping_or_a_flat_list() -> None:
    # redis-py's HGETALL (str with decode_responses), hiredis's (RawPipeline)
    as_mapping: dict[bytes | str, bytes | str] = {b"imp:60000": b"3", b"clk:60000": b"1"}
    as_mapping["junk"] = "7"
    flat: list[bytes | str] = [b"imp:60000", b"3", b"clk:60000", b"1", "junk", "7"]
    expected = {"imp:60000": 3, "clk:60000": 1, "junk": 7}
    assert decode_buckets(as_mapping) == expected
    assert decode_buckets(flat) == expected
    assert decode_buckets({}) == decode_buckets([]) == {}
    with pytest.raises(ValueError):
        decode_buckets([b"imp:0", b"3", b"clk:0"])


def _counter_round_trips(
    hashes: list[Any],
) -> tuple[dict[str, WindowTotals], Sequence[tuple[Any, ...]]]:
    """Drive counter_flow with canned replies; return its totals and its second step."""
    settings = CounterSettings(window_ms=180_000, bucket_ms=60_000)
    events = [("a", "impression", 200_000), ("a", "click", 201_000), ("b", "impression", 130_000)]
    flow = counter_flow(KeySpace("t:"), settings, events)
    first = next(flow)
    assert [c[0] for c in first] == ["HINCRBY"] * 3 + ["HGETALL"] * 2 + ["HGET"] * 2
    # HINCRBY counts, the two bucket hashes, then the anchors stored with the totals
    writes = flow.send([2, 1, 4, *hashes, None, b"240000"])
    with pytest.raises(StopIteration) as stop:
        flow.send([1] * len(writes))
    totals: dict[str, WindowTotals] = stop.value.value
    return totals, writes


def test_counter_flow_reads_redis_py_and_hiredis_replies_alike() -> None:
    a_hash = {b"imp:0": b"5", b"imp:180000": b"2", b"clk:180000": b"1"}
    b_hash = {b"imp:120000": b"4"}
    flat = [[x for pair in h.items() for x in pair] for h in (a_hash, b_hash)]
    totals, writes = _counter_round_trips([a_hash, b_hash])
    assert _counter_round_trips(flat) == (totals, writes)
    assert (totals["a"].impressions, totals["a"].clicks, totals["a"].anchor_ms) == (2, 1, 180_000)
    # b's stored anchor (a later batch) keeps its window ahead of this batch's
    assert (totals["b"].impressions, totals["b"].clicks, totals["b"].anchor_ms) == (4, 0, 240_000)
    assert writes[0] == ("HDEL", "t:cnt:item:a", "imp:0")


def test_counter_client_falls_back_to_redis_py_where_raw_cannot_go() -> None:
    assert isinstance(counter_client("redis://127.0.0.1:6379/0"), RawPipeline)
    assert isinstance(counter_client("unix:///tmp/redis.sock"), RawPipeline)
    fallback = counter_client("rediss://127.0.0.1:6380/0", timeout_s=1.5)
    assert isinstance(fallback, redis.asyncio.Redis)
    assert fallback.connection_pool.connection_kwargs["socket_timeout"] == 1.5
    with pytest.raises(ValueError):
        counter_client("redis://127.0.0.1:6379/0", timeout_s=0)


def _drive(flow: Flow[Any], replies: list[list[Any]]) -> Any:
    """Run a flow against canned replies, one list per step, without Redis."""
    step = next(flow)
    for reply in replies:
        assert len(reply) == len(step)
        try:
            step = flow.send(reply)
        except StopIteration as stop:
            return stop.value
    raise AssertionError("the flow asked for more steps than were scripted")


def test_load_flow_rereads_latest_when_the_version_vanishes() -> None:
    keys = KeySpace("t:")
    blob = _blob()
    meta = encode_meta({"step": 6}, blob, 6, 0)
    # latest was 5, got pruned before its parts were read; the re-read finds 6
    replies: list[list[Any]] = [[b"5"], [None, {}], [b"6"], [blob, meta]]
    snapshot = _drive(load_flow(keys, "ple"), replies)
    assert (snapshot.version, snapshot.meta["step"]) == (6, 6)
    with pytest.raises(CorruptSnapshotError, match="not stored"):
        _drive(load_flow(keys, "ple", tries=2), [[b"5"], [None, {}], [b"5"], [None, {}]])
    with pytest.raises(SnapshotNotFoundError):
        _drive(load_flow(keys, "ple"), [[None]])
    # a pinned version is read once and never retried
    with pytest.raises(SnapshotNotFoundError):
        _drive(load_flow(keys, "ple", 5), [[None, {}]])
