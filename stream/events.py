"""Plain typed events and samples of the join, and a fast decoder that never crashes on input.

These classes are what the hot path uses: frozen slotted dataclasses, built by
:func:`decode_event` straight from the raw Kafka value with orjson. The faust
Records in :mod:`stream.records` mirror them for users and faust tooling.

Plain JSON layout of a :class:`Sample` (the ``samples`` topic; the learner reads it
without faust, see :func:`decode_sample`)::

    {
      "sample_id": "imp-1#2",          # impression_id, plus "#<revision>" when revision > 0
      "user_id": "u1", "item_id": "i9",
      "features": {"user_segment": "s3", "item_price": 9.5},   # from the impression
      "ts": 1700000000000,             # impression event time, epoch ms
      "labels": {"click": 1, "conversion": 1, "ysl": 2},
      "masks": {"ctr": 1, "cvr": 1, "ctcvr": 1, "ysl": 1},
      "kind": "correction",            # "final" | "early" | "correction"
      "revision": 2,                   # 0 for final/early, 1, 2, ... for corrections
      "elapsed_ms": 1800000,           # emission event time minus "ts"
      "emitted_at": 1700000123456      # wall clock at emission, epoch ms
    }
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias

import orjson

from stream.errors import BadEventError

__all__ = [
    "CLICKS",
    "DEAD_LETTERS",
    "DEFAULT_LIMITS",
    "FOLLOW_CLICKS",
    "IMPRESSIONS",
    "MAX_SAMPLE_ID_LEN",
    "MIN_EVENT_TS_MS",
    "SAMPLES",
    "SAMPLE_KINDS",
    "Click",
    "DeadLetter",
    "DecodeLimits",
    "Event",
    "FeatureValue",
    "Features",
    "FollowClick",
    "Impression",
    "Labels",
    "Masks",
    "Sample",
    "SampleKind",
    "YslSpace",
    "dead_letter",
    "dead_letter_for",
    "decode_event",
    "decode_sample",
    "encode_event",
    "encode_sample",
    "parse_event",
    "require_features",
    "require_int",
    "require_object",
    "require_str",
    "sample_id_for",
    "topic_of",
]

IMPRESSIONS: Final = "impressions"
CLICKS: Final = "clicks"
FOLLOW_CLICKS: Final = "follow_clicks"
SAMPLES: Final = "samples"
DEAD_LETTERS: Final = "dead_letters"

MIN_EVENT_TS_MS: Final = 946_684_800_000  # 2000-01-01T00:00:00Z: nothing real is older
MAX_EVENT_TS_MS: Final = 4_102_444_800_000  # 2100-01-01T00:00:00Z: caps ts when skew is off

FeatureValue: TypeAlias = str | int | float | bool | None
Features: TypeAlias = dict[str, FeatureValue]
SampleKind: TypeAlias = Literal["final", "early", "correction"]
YslSpace: TypeAlias = Literal["clicked", "all"]

_SCALARS: Final = frozenset({str, int, float, bool})
#: the values of Sample.kind; a tuple: `in` must not hash a bad value
SAMPLE_KINDS: Final = ("final", "early", "correction")
#: the longest id a sample may carry
MAX_SAMPLE_ID_LEN: Final = 1 << 16
_MISSING: Final = object()


@dataclass(frozen=True, slots=True)
class Impression:
    """One served item, the left side of the join (topic ``impressions``)."""

    impression_id: str
    request_id: str
    user_id: str
    item_id: str
    ts: int  # event time, epoch ms
    position: int  # rank in the served list, 0-based
    features: Features = field(default_factory=dict)  # what the scorer used (features.md)
    context: dict[str, Any] = field(default_factory=dict)  # free-form request context

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready dict (the topic's wire layout)."""
        return {
            "impression_id": self.impression_id,
            "request_id": self.request_id,
            "user_id": self.user_id,
            "item_id": self.item_id,
            "ts": self.ts,
            "position": self.position,
            "features": self.features,
            "context": self.context,
        }


@dataclass(frozen=True, slots=True)
class Click:
    """A click on an impression (topic ``clicks``)."""

    impression_id: str
    ts: int  # event time, epoch ms
    click_id: str | None = None  # dedupe key; without it clicks dedupe by ts

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready dict (the topic's wire layout)."""
        return {"impression_id": self.impression_id, "ts": self.ts, "click_id": self.click_id}


@dataclass(frozen=True, slots=True)
class FollowClick:
    """A follow-on click on the page an impression's click led to (topic ``follow_clicks``)."""

    impression_id: str
    ts: int  # event time, epoch ms
    follow_id: str | None = None  # dedupe key; without it follow-ons dedupe by (ts, item_id)
    item_id: str | None = None  # the item clicked on the next page, if known

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready dict (the topic's wire layout)."""
        return {
            "impression_id": self.impression_id,
            "ts": self.ts,
            "follow_id": self.follow_id,
            "item_id": self.item_id,
        }


Event: TypeAlias = Impression | Click | FollowClick


@dataclass(frozen=True, slots=True)
class Labels:
    """The labels of one impression: ``click`` and ``conversion`` are 0/1, ``ysl`` >= 0."""

    click: int
    conversion: int
    ysl: int

    def to_dict(self) -> dict[str, int]:
        """Return ``{"click", "conversion", "ysl"}``."""
        return {"click": self.click, "conversion": self.conversion, "ysl": self.ysl}


@dataclass(frozen=True, slots=True)
class Masks:
    """Per-task loss masks (1 = the sample is in the task's sample space)."""

    ctr: int
    cvr: int
    ctcvr: int
    ysl: int

    @classmethod
    def for_labels(cls, labels: Labels, ysl_space: YslSpace = "clicked") -> Masks:
        """Return the masks of ``labels``: cvr over clicks, ysl over clicks or everything.

        Examples
        --------
        >>> Masks.for_labels(Labels(click=0, conversion=0, ysl=0))
        Masks(ctr=1, cvr=0, ctcvr=1, ysl=0)
        >>> Masks.for_labels(Labels(click=0, conversion=0, ysl=0), "all").ysl
        1
        """
        ysl = 1 if ysl_space == "all" else labels.click
        return cls(ctr=1, cvr=labels.click, ctcvr=1, ysl=ysl)

    def to_dict(self) -> dict[str, int]:
        """Return ``{"ctr", "cvr", "ctcvr", "ysl"}``."""
        return {"ctr": self.ctr, "cvr": self.cvr, "ctcvr": self.ctcvr, "ysl": self.ysl}


def sample_id_for(impression_id: str, revision: int) -> str:
    """Return the deterministic sample id: the impression id, plus ``#revision`` if > 0.

    Examples
    --------
    >>> sample_id_for("imp-1", 0), sample_id_for("imp-1", 2)
    ('imp-1', 'imp-1#2')
    """
    return impression_id if revision == 0 else f"{impression_id}#{revision}"


@dataclass(frozen=True, slots=True)
class Sample:
    """A labelled training sample (topic ``samples``); layout in the module docstring."""

    sample_id: str
    user_id: str
    item_id: str
    features: Features
    ts: int  # impression event time, epoch ms
    labels: Labels
    masks: Masks
    kind: SampleKind
    revision: int  # 0 for final/early samples, 1, 2, ... for corrections
    elapsed_ms: int  # emission event time minus ts
    emitted_at: int  # wall clock at emission, epoch ms

    @property
    def impression_id(self) -> str:
        """Return the impression id this sample was joined from."""
        if self.revision == 0:
            return self.sample_id
        return self.sample_id.rpartition("#")[0]

    def to_dict(self) -> dict[str, Any]:
        """Return the documented plain JSON layout."""
        return {
            "sample_id": self.sample_id,
            "user_id": self.user_id,
            "item_id": self.item_id,
            "features": self.features,
            "ts": self.ts,
            "labels": self.labels.to_dict(),
            "masks": self.masks.to_dict(),
            "kind": self.kind,
            "revision": self.revision,
            "elapsed_ms": self.elapsed_ms,
            "emitted_at": self.emitted_at,
        }

    @classmethod
    def from_dict(cls, obj: object) -> Sample:
        """Build a sample from its plain JSON layout; raise :class:`BadEventError` if malformed."""
        if type(obj) is not dict:
            raise BadEventError("not_object")
        labels = require_object(obj, "labels")
        masks = require_object(obj, "masks")
        kind = obj.get("kind")
        if kind not in SAMPLE_KINDS:
            raise BadEventError("bad_value:kind")
        return cls(
            sample_id=require_str(obj, "sample_id", MAX_SAMPLE_ID_LEN),
            user_id=require_str(obj, "user_id", MAX_SAMPLE_ID_LEN),
            item_id=require_str(obj, "item_id", MAX_SAMPLE_ID_LEN),
            features=require_features(obj),
            ts=require_int(obj, "ts"),
            labels=Labels(
                click=require_int(labels, "click"),
                conversion=require_int(labels, "conversion"),
                ysl=require_int(labels, "ysl"),
            ),
            masks=Masks(
                ctr=require_int(masks, "ctr"),
                cvr=require_int(masks, "cvr"),
                ctcvr=require_int(masks, "ctcvr"),
                ysl=require_int(masks, "ysl"),
            ),
            kind=kind,
            revision=require_int(obj, "revision"),
            elapsed_ms=require_int(obj, "elapsed_ms"),
            emitted_at=require_int(obj, "emitted_at"),
        )


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record the stream could not use (topic ``dead_letters``)."""

    topic: str  # where the record came from
    partition: int  # its partition, -1 if unknown
    offset: int  # its offset, -1 if unknown (e.g. an orphan released from join state)
    raw: str  # the record's value bytes, base64
    reason: str  # a BadEventError reason code, or a join reason such as "orphan"

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready dict."""
        return {
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "raw": self.raw,
            "reason": self.reason,
        }

    def raw_bytes(self) -> bytes:
        """Return the original value bytes (b"" if ``raw`` is not valid base64)."""
        try:
            return base64.b64decode(self.raw, validate=True)
        except (binascii.Error, ValueError):
            return b""


def dead_letter(
    topic: str, partition: int, offset: int, raw: bytes | None, reason: str
) -> DeadLetter:
    """Wrap a rejected record for the ``dead_letters`` topic, its value as base64 text.

    Examples
    --------
    >>> dl = dead_letter("clicks", 3, 42, b"not json", "invalid_json")
    >>> dl.raw, dl.raw_bytes()
    ('bm90IGpzb24=', b'not json')
    """
    text = base64.b64encode(raw or b"").decode("ascii")
    return DeadLetter(topic=topic, partition=partition, offset=offset, raw=text, reason=reason)


def topic_of(event: Event) -> str:
    """Return the input topic an event belongs to."""
    if isinstance(event, Impression):
        return IMPRESSIONS
    if isinstance(event, Click):
        return CLICKS
    return FOLLOW_CLICKS


def encode_event(event: Event) -> bytes:
    """Serialise an event to its JSON wire form."""
    return orjson.dumps(event.to_dict())


def dead_letter_for(event: Event, partition: int, reason: str) -> DeadLetter:
    """Dead-letter an already decoded event (e.g. an orphan the join gave up on)."""
    return dead_letter(topic_of(event), partition, -1, encode_event(event), reason)


def encode_sample(sample: Sample) -> bytes:
    """Serialise a sample to its plain JSON layout."""
    return orjson.dumps(sample.to_dict())


def decode_sample(raw: bytes) -> Sample:
    """Parse a plain-JSON sample; raise :class:`BadEventError` on anything malformed."""
    try:
        obj = orjson.loads(raw)
    except (orjson.JSONDecodeError, TypeError):
        raise BadEventError("invalid_json") from None
    return Sample.from_dict(obj)


# --- decoding ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """What the decoder accepts; anything else is a :class:`BadEventError`."""

    max_bytes: int = 64 * 1024  # larger payloads are rejected before parsing
    max_id_len: int = 256  # ids are non-empty strings up to this many characters
    min_ts_ms: int = MIN_EVENT_TS_MS  # older event times are impossible
    max_ts_ms: int = MAX_EVENT_TS_MS  # later event times are impossible
    # How far past ``now_ms`` an event time may be (producer clock skew); None turns the
    # check off, e.g. to replay a simulated world whose clock runs ahead of the wall.
    max_future_skew_ms: int | None = 3_600_000


DEFAULT_LIMITS: Final = DecodeLimits()

_Parser: TypeAlias = Callable[[dict[str, Any], DecodeLimits], Event]


def decode_event(
    topic: str,
    raw: bytes | None,
    *,
    limits: DecodeLimits = DEFAULT_LIMITS,
    now_ms: int | None = None,
) -> Event:
    """Decode one raw input record; raise :class:`BadEventError` (and nothing else) if unusable.

    Parameters
    ----------
    topic
        ``"impressions"``, ``"clicks"`` or ``"follow_clicks"``: picks the record type.
    raw
        The Kafka value bytes (None for a tombstone, which is rejected).
    limits
        Size, id and timestamp limits.
    now_ms
        Wall clock for the future-skew check; None reads ``time.time()``.

    Examples
    --------
    >>> decode_event("clicks", b'{"impression_id": "imp-1", "ts": 1700000000000}', now_ms=0)
    Traceback (most recent call last):
    ...
    stream.errors.BadEventError: ts_in_future
    >>> decode_event("clicks", b'{"impression_id": "imp-1", "ts": 1700000000000}')
    Click(impression_id='imp-1', ts=1700000000000, click_id=None)
    """
    parser = _PARSERS.get(topic)
    if parser is None:
        raise ValueError(f"unknown input topic {topic!r}; expected one of {sorted(_PARSERS)}")
    if not raw:
        raise BadEventError("empty")
    if len(raw) > limits.max_bytes:
        raise BadEventError("too_large")
    try:
        obj = orjson.loads(raw)
    except (orjson.JSONDecodeError, TypeError):
        # JSONDecodeError covers invalid UTF-8 too; TypeError a non-bytes value.
        raise BadEventError("invalid_json") from None
    return _finish(parser, obj, limits, now_ms)


def parse_event(
    topic: str,
    obj: object,
    *,
    limits: DecodeLimits = DEFAULT_LIMITS,
    now_ms: int | None = None,
) -> Event:
    """Validate an already parsed JSON object as an event of ``topic`` (see decode_event)."""
    parser = _PARSERS.get(topic)
    if parser is None:
        raise ValueError(f"unknown input topic {topic!r}; expected one of {sorted(_PARSERS)}")
    return _finish(parser, obj, limits, now_ms)


def _finish(parser: _Parser, obj: object, limits: DecodeLimits, now_ms: int | None) -> Event:
    if type(obj) is not dict:
        raise BadEventError("not_object")
    event = parser(obj, limits)
    _check_ts(event.ts, limits, now_ms)
    return event


def _check_ts(ts: int, limits: DecodeLimits, now_ms: int | None) -> None:
    if ts < 0:
        raise BadEventError("ts_negative")
    if ts < limits.min_ts_ms:
        raise BadEventError("ts_too_old")
    if ts > limits.max_ts_ms:
        raise BadEventError("ts_too_far")
    skew = limits.max_future_skew_ms
    if skew is not None:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        if ts > now + skew:
            raise BadEventError("ts_in_future")


def _parse_impression(obj: dict[str, Any], limits: DecodeLimits) -> Impression:
    n = limits.max_id_len
    position = require_int(obj, "position")
    if position < 0:
        raise BadEventError("bad_value:position")
    context = obj.get("context")
    if context is None:
        context = {}
    elif type(context) is not dict:
        raise BadEventError("bad_type:context")
    return Impression(
        impression_id=require_str(obj, "impression_id", n),
        request_id=require_str(obj, "request_id", n),
        user_id=require_str(obj, "user_id", n),
        item_id=require_str(obj, "item_id", n),
        ts=require_int(obj, "ts"),
        position=position,
        features=require_features(obj),
        context=context,
    )


def _parse_click(obj: dict[str, Any], limits: DecodeLimits) -> Click:
    n = limits.max_id_len
    return Click(
        impression_id=require_str(obj, "impression_id", n),
        ts=require_int(obj, "ts"),
        click_id=_opt_str(obj, "click_id", n),
    )


def _parse_follow(obj: dict[str, Any], limits: DecodeLimits) -> FollowClick:
    n = limits.max_id_len
    return FollowClick(
        impression_id=require_str(obj, "impression_id", n),
        ts=require_int(obj, "ts"),
        follow_id=_opt_str(obj, "follow_id", n),
        item_id=_opt_str(obj, "item_id", n),
    )


_PARSERS: Final[dict[str, _Parser]] = {
    IMPRESSIONS: _parse_impression,
    CLICKS: _parse_click,
    FOLLOW_CLICKS: _parse_follow,
}


def require_str(obj: Mapping[str, Any], name: str, max_len: int = MAX_SAMPLE_ID_LEN) -> str:
    """Return ``obj[name]`` if it is a non-empty str of at most ``max_len`` chars, else raise
    :class:`BadEventError` (``missing:``, ``bad_type:`` or ``bad_value:`` + name)."""
    value = obj.get(name, _MISSING)
    if value is _MISSING:
        raise BadEventError(f"missing:{name}")
    if type(value) is not str:
        raise BadEventError(f"bad_type:{name}")
    if not value or len(value) > max_len:
        raise BadEventError(f"bad_value:{name}")
    return value


def _opt_str(obj: dict[str, Any], name: str, max_len: int) -> str | None:
    value = obj.get(name)
    if value is None:
        return None
    if type(value) is not str:
        raise BadEventError(f"bad_type:{name}")
    if not value or len(value) > max_len:
        raise BadEventError(f"bad_value:{name}")
    return value


def require_int(obj: Mapping[str, Any], name: str) -> int:
    """Return ``obj[name]`` if it is an int (not a bool), else raise :class:`BadEventError`."""
    value = obj.get(name, _MISSING)
    if value is _MISSING:
        raise BadEventError(f"missing:{name}")
    # `type(...) is int` on purpose: bool is a subclass of int and must not pass.
    if type(value) is not int:
        raise BadEventError(f"bad_type:{name}")
    return value


def require_object(obj: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Return ``obj[name]`` if it is a JSON object, else raise :class:`BadEventError`."""
    value = obj.get(name, _MISSING)
    if value is _MISSING:
        raise BadEventError(f"missing:{name}")
    if type(value) is not dict:
        raise BadEventError(f"bad_type:{name}")
    return value


def require_features(obj: Mapping[str, Any]) -> Features:
    """Return ``obj["features"]`` (``{}`` when absent) if it maps names to scalars or null."""
    value = obj.get("features")
    if value is None:
        return {}
    if type(value) is not dict:
        raise BadEventError("bad_type:features")
    for item in value.values():
        if item is not None and type(item) not in _SCALARS:
            raise BadEventError("bad_type:features")
    return value
