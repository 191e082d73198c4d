"""Plain events, the total decoder, samples, dead letters and the faust Records."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from stream import records
from stream.errors import BadEventError
from stream.events import (
    MIN_EVENT_TS_MS,
    Click,
    DecodeLimits,
    FollowClick,
    Impression,
    Labels,
    Masks,
    Sample,
    dead_letter,
    dead_letter_for,
    decode_event,
    decode_sample,
    encode_event,
    encode_sample,
    sample_id_for,
)

NOW = 1_700_000_000_000
TS = NOW - 60_000

IMPRESSION: dict[str, Any] = {
    "impression_id": "imp-1",
    "request_id": "req-1",
    "user_id": "u1",
    "item_id": "i1",
    "ts": TS,
    "position": 3,
    "features": {"user_segment": "s3", "item_price": 9.5, "item_ctr_1h": None, "n": 2},
    "context": {"page": "home", "nested": {"ok": [1, 2]}},
}
CLICK: dict[str, Any] = {"impression_id": "imp-1", "ts": TS + 1, "click_id": "c1"}
FOLLOW: dict[str, Any] = {
    "impression_id": "imp-1",
    "ts": TS + 2,
    "follow_id": "f1",
    "item_id": "i7",
}
VALID = {"impressions": IMPRESSION, "clicks": CLICK, "follow_clicks": FOLLOW}


def _decode(topic: str, obj: object, **kw: Any) -> object:
    return decode_event(topic, orjson.dumps(obj), now_ms=NOW, **kw)


def _reason(topic: str, obj: object, **kw: Any) -> str:
    with pytest.raises(BadEventError) as info:
        _decode(topic, obj, **kw)
    return info.value.reason


def _sample(**over: Any) -> Sample:
    labels = Labels(click=1, conversion=1, ysl=2)
    fields: dict[str, Any] = {
        "sample_id": sample_id_for("imp-1", 2),
        "user_id": "u1",
        "item_id": "i1",
        "features": {"user_segment": "s3", "item_price": 9.5},
        "ts": TS,
        "labels": labels,
        "masks": Masks.for_labels(labels),
        "kind": "correction",
        "revision": 2,
        "elapsed_ms": 1_800_000,
        "emitted_at": NOW,
    }
    fields.update(over)
    return Sample(**fields)


# --- decoding valid records -------------------------------------------------------------


def test_decode_builds_typed_events() -> None:
    imp = _decode("impressions", IMPRESSION)
    assert isinstance(imp, Impression)
    assert imp.features["item_price"] == 9.5 and imp.context["page"] == "home"
    click = _decode("clicks", CLICK)
    assert click == Click("imp-1", TS + 1, "c1")
    follow = _decode("follow_clicks", FOLLOW)
    assert follow == FollowClick("imp-1", TS + 2, "f1", "i7")


@pytest.mark.parametrize("topic", sorted(VALID))
def test_encode_decode_round_trip(topic: str) -> None:
    event = _decode(topic, VALID[topic])
    assert isinstance(event, Impression | Click | FollowClick)
    assert decode_event(topic, encode_event(event), now_ms=NOW) == event


def test_optional_fields_may_be_missing_or_null_and_extra_keys_are_tolerated() -> None:
    minimal = {k: IMPRESSION[k] for k in IMPRESSION if k not in ("features", "context")}
    imp = _decode("impressions", {**minimal, "features": None, "unknown": [1]})
    assert isinstance(imp, Impression) and imp.features == {} and imp.context == {}
    assert _decode("clicks", {"impression_id": "x", "ts": TS}) == Click("x", TS)
    follow = _decode("follow_clicks", {"impression_id": "x", "ts": TS, "follow_id": None})
    assert follow == FollowClick("x", TS)


# --- rejecting bad records --------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "empty"),
        (None, "empty"),
        (b"{not json", "invalid_json"),
        (b'{"impression_id": "\xff\xfe", "ts": 1}', "invalid_json"),  # not UTF-8
        (b"[1, 2]", "not_object"),
        (b"42", "not_object"),
        (b'"text"', "not_object"),
        (b"null", "not_object"),
        (b'{"impression_id": "a", "ts": NaN}', "invalid_json"),
        (b"[" * 60_000, "invalid_json"),  # nesting deeper than the parser allows
        (b'{"impression_id": "\\ud800", "ts": 1}', "invalid_json"),  # lone surrogate
        (b'{"impression_id": "a", "ts": 1e400}', "invalid_json"),
        # orjson reads an int past 64 bits as a float: a wrong type, not a crash
        (b'{"impression_id": "a", "ts": 99999999999999999999999}', "bad_type:ts"),
    ],
)
def test_unparseable_payloads(raw: bytes | None, reason: str) -> None:
    with pytest.raises(BadEventError) as info:
        decode_event("clicks", raw, now_ms=NOW)
    assert info.value.reason == reason


@pytest.mark.parametrize("topic", sorted(VALID))
def test_every_required_field_is_required(topic: str) -> None:
    required = {
        "impressions": ["impression_id", "request_id", "user_id", "item_id", "ts", "position"],
        "clicks": ["impression_id", "ts"],
        "follow_clicks": ["impression_id", "ts"],
    }[topic]
    for name in required:
        obj = {k: v for k, v in VALID[topic].items() if k != name}
        assert _reason(topic, obj) == f"missing:{name}"


@pytest.mark.parametrize(
    ("topic", "name", "value", "reason"),
    [
        ("clicks", "ts", True, "bad_type:ts"),  # bool is not an int
        ("clicks", "ts", float(TS), "bad_type:ts"),
        ("clicks", "ts", str(TS), "bad_type:ts"),
        ("clicks", "ts", None, "bad_type:ts"),
        ("clicks", "impression_id", 7, "bad_type:impression_id"),
        ("clicks", "impression_id", "", "bad_value:impression_id"),
        ("clicks", "impression_id", "x" * 257, "bad_value:impression_id"),
        ("clicks", "click_id", 5, "bad_type:click_id"),
        ("clicks", "click_id", "", "bad_value:click_id"),
        ("follow_clicks", "item_id", ["a"], "bad_type:item_id"),
        ("follow_clicks", "follow_id", False, "bad_type:follow_id"),
        ("impressions", "position", -1, "bad_value:position"),
        ("impressions", "position", False, "bad_type:position"),
        ("impressions", "user_id", None, "bad_type:user_id"),
        ("impressions", "features", [1, 2], "bad_type:features"),
        ("impressions", "features", {"a": {"nested": 1}}, "bad_type:features"),
        ("impressions", "features", {"a": [1]}, "bad_type:features"),
        ("impressions", "context", "home", "bad_type:context"),
    ],
)
def test_wrong_types_and_values(topic: str, name: str, value: object, reason: str) -> None:
    assert _reason(topic, {**VALID[topic], name: value}) == reason


def test_id_length_limit_is_inclusive_and_configurable() -> None:
    assert isinstance(_decode("clicks", {**CLICK, "impression_id": "x" * 256}), Click)
    limits = DecodeLimits(max_id_len=8)
    assert _reason("clicks", {**CLICK, "impression_id": "x" * 9}, limits=limits) == (
        "bad_value:impression_id"
    )


def test_oversized_payload_is_rejected_before_parsing() -> None:
    raw = orjson.dumps({**CLICK, "pad": "x" * 100})
    limits = DecodeLimits(max_bytes=len(raw))
    assert isinstance(decode_event("clicks", raw, limits=limits, now_ms=NOW), Click)
    with pytest.raises(BadEventError, match="too_large"):
        decode_event("clicks", raw + b" ", limits=DecodeLimits(max_bytes=len(raw)), now_ms=NOW)
    with pytest.raises(BadEventError, match="too_large"):
        decode_event("clicks", b"{" * 100_000, now_ms=NOW)  # default limit, and no parse


@pytest.mark.parametrize(
    ("ts", "reason"),
    [
        (-1, "ts_negative"),
        (0, "ts_too_old"),
        (MIN_EVENT_TS_MS - 1, "ts_too_old"),
        (NOW + 3_600_001, "ts_in_future"),
        (NOW + 10**9, "ts_in_future"),
        (10**16, "ts_too_far"),
    ],
)
def test_impossible_timestamps(ts: int, reason: str) -> None:
    assert _reason("clicks", {**CLICK, "ts": ts}) == reason


def test_timestamp_bounds_are_inclusive_and_skew_configurable() -> None:
    assert isinstance(_decode("clicks", {**CLICK, "ts": MIN_EVENT_TS_MS}), Click)
    assert isinstance(_decode("clicks", {**CLICK, "ts": NOW + 3_600_000}), Click)
    no_skew = DecodeLimits(max_future_skew_ms=None)
    assert isinstance(_decode("clicks", {**CLICK, "ts": NOW + 10**9}, limits=no_skew), Click)
    assert _reason("clicks", {**CLICK, "ts": 10**16}, limits=no_skew) == "ts_too_far"
    tight = DecodeLimits(max_future_skew_ms=0)
    assert _reason("clicks", {**CLICK, "ts": NOW + 1}, limits=tight) == "ts_in_future"


def test_unknown_topic_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="unknown input topic"):
        decode_event("samples", orjson.dumps(CLICK), now_ms=NOW)


def _mutations(rng: random.Random, valid: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for _ in range(3000):
        base = bytearray(rng.choice(valid))
        kind = rng.randrange(5)
        if kind == 0:  # random bytes
            out.append(rng.randbytes(rng.randrange(0, 200)))
        elif kind == 1:  # bit flips
            for _ in range(rng.randrange(1, 4)):
                base[rng.randrange(len(base))] ^= 1 << rng.randrange(8)
            out.append(bytes(base))
        elif kind == 2:  # truncation
            out.append(bytes(base[: rng.randrange(len(base))]))
        elif kind == 3:  # splice in a random byte run
            i = rng.randrange(len(base))
            out.append(bytes(base[:i]) + rng.randbytes(rng.randrange(1, 8)) + bytes(base[i:]))
        else:  # valid JSON with a random field replaced by a random JSON value
            obj = orjson.loads(bytes(base))
            key = rng.choice([*obj, "extra"])
            obj[key] = rng.choice([None, True, -1, 2**62, -(2**63), 1.5, "", "x", [], {}, [{}]])
            out.append(orjson.dumps(obj))
    return out


def test_fuzz_decoder_raises_only_bad_event() -> None:
    rng = random.Random(1234)
    valid = [orjson.dumps(v) for v in VALID.values()]
    accepted = rejected = 0
    for raw in _mutations(rng, valid):
        for topic in VALID:
            try:
                event = decode_event(topic, raw, now_ms=NOW)
            except BadEventError as exc:
                assert exc.reason
                rejected += 1
            else:
                assert isinstance(event, Impression | Click | FollowClick)
                assert isinstance(event.ts, int) and event.ts >= MIN_EVENT_TS_MS
                accepted += 1
    assert accepted > 100 and rejected > 1000  # the fuzz exercised both paths


# --- samples and dead letters -----------------------------------------------------------


def test_sample_plain_json_layout() -> None:
    sample = _sample()
    assert sample.sample_id == "imp-1#2" and sample.impression_id == "imp-1"
    assert sample.to_dict() == {
        "sample_id": "imp-1#2",
        "user_id": "u1",
        "item_id": "i1",
        "features": {"user_segment": "s3", "item_price": 9.5},
        "ts": TS,
        "labels": {"click": 1, "conversion": 1, "ysl": 2},
        "masks": {"ctr": 1, "cvr": 1, "ctcvr": 1, "ysl": 1},
        "kind": "correction",
        "revision": 2,
        "elapsed_ms": 1_800_000,
        "emitted_at": NOW,
    }
    assert decode_sample(encode_sample(sample)) == sample


def test_sample_impression_id_with_hash_in_the_id() -> None:
    assert _sample(sample_id="a#b", revision=0, kind="final").impression_id == "a#b"
    assert _sample(sample_id=sample_id_for("a#b", 3), revision=3).impression_id == "a#b"


def test_masks_follow_the_sample_spaces() -> None:
    unclicked = Labels(click=0, conversion=0, ysl=0)
    clicked = Labels(click=1, conversion=0, ysl=0)
    assert Masks.for_labels(unclicked) == Masks(ctr=1, cvr=0, ctcvr=1, ysl=0)
    assert Masks.for_labels(clicked) == Masks(ctr=1, cvr=1, ctcvr=1, ysl=1)
    assert Masks.for_labels(unclicked, "all") == Masks(ctr=1, cvr=0, ctcvr=1, ysl=1)


@pytest.mark.parametrize(
    "broken",
    [
        b"[]",
        b"{",
        orjson.dumps({**_sample().to_dict(), "kind": "maybe"}),
        orjson.dumps({**_sample().to_dict(), "kind": ["final"]}),
        orjson.dumps({**_sample().to_dict(), "labels": [1, 0, 0]}),
        orjson.dumps({**_sample().to_dict(), "labels": {"click": True, "conversion": 0, "ysl": 0}}),
        orjson.dumps({k: v for k, v in _sample().to_dict().items() if k != "masks"}),
    ],
)
def test_decode_sample_rejects_malformed(broken: bytes) -> None:
    with pytest.raises(BadEventError):
        decode_sample(broken)


def test_dead_letters_keep_the_raw_bytes() -> None:
    raw = bytes(range(256))
    letter = dead_letter("clicks", 2, 99, raw, "invalid_json")
    assert letter.raw_bytes() == raw
    assert orjson.loads(orjson.dumps(letter.to_dict()))["offset"] == 99
    assert dead_letter("clicks", 0, 0, None, "empty").raw_bytes() == b""
    click = Click("imp-9", TS, "c9")
    orphan = dead_letter_for(click, 4, "orphan")
    assert (orphan.topic, orphan.partition, orphan.offset) == ("clicks", 4, -1)
    assert decode_event("clicks", orphan.raw_bytes(), now_ms=NOW) == click


# --- faust Records ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record_type", "topic"),
    [
        (records.Impression, "impressions"),
        (records.Click, "clicks"),
        (records.FollowClick, "follow_clicks"),
    ],
)
def test_records_round_trip_with_plain_events(record_type: Any, topic: str) -> None:
    event = _decode(topic, VALID[topic])
    record = record_type.from_event(event)
    assert record.to_event(now_ms=NOW) == event
    again = record_type.loads(record.dumps())
    assert again.to_event(now_ms=NOW) == event


def test_record_to_event_is_strict_where_faust_is_not() -> None:
    with pytest.raises(BadEventError, match="ts_negative"):
        records.Click(impression_id="imp-1", ts=-5).to_event(now_ms=NOW)
    coerced = records.Click(impression_id="imp-1", ts=1.5)  # faust silently makes this 1
    with pytest.raises(BadEventError, match="ts_too_old"):
        coerced.to_event(now_ms=NOW)


def test_sample_record_json_is_the_plain_layout() -> None:
    sample = _sample()
    record = records.Sample.from_event(sample)
    assert orjson.loads(record.dumps()) == sample.to_dict()  # no __faust metadata
    assert records.Sample.loads(encode_sample(sample)).to_event() == sample


def test_dead_letter_record_round_trip() -> None:
    letter = dead_letter("follow_clicks", 1, 5, b"\x00garbage", "invalid_json")
    record = records.DeadLetter.from_event(letter)
    assert records.DeadLetter.loads(record.dumps()).to_event() == letter
