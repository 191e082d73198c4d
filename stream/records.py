"""faust Records for the five topics, mirroring the plain classes in :mod:`stream.events`.

The worker's hot path decodes raw bytes into :mod:`stream.events` classes; these Records
are for users scripting against the topics with faust, and for faust tooling. They carry
the same JSON fields, and convert both ways with ``to_event()`` / ``from_event()``.
faust's own validation is lenient (it silently coerces ``True`` or ``1.5`` to an int and
accepts any timestamp), so ``to_event()`` goes through the same checks as
:func:`stream.events.decode_event` and raises :class:`BadEventError`.

The ``Sample`` record drops faust's ``__faust`` metadata (``include_metadata=False``), so
its JSON is exactly the plain layout documented in :mod:`stream.events`.
"""

from __future__ import annotations

from typing import Any

import faust

from stream import events
from stream.events import DEFAULT_LIMITS, DecodeLimits

__all__ = ["Click", "DeadLetter", "FollowClick", "Impression", "Sample"]

_RECORD_OPTIONS: dict[str, Any] = {"serializer": "json", "validation": True, "isodates": True}


class Impression(faust.Record, namespace="mtlstream.Impression", **_RECORD_OPTIONS):
    """An ``impressions`` record."""

    impression_id: str
    request_id: str
    user_id: str
    item_id: str
    ts: int
    position: int
    features: dict[str, Any] | None = None
    context: dict[str, Any] | None = None

    def to_event(
        self, *, limits: DecodeLimits = DEFAULT_LIMITS, now_ms: int | None = None
    ) -> events.Impression:
        """Return the plain event, strictly validated (raises BadEventError)."""
        event = events.parse_event(events.IMPRESSIONS, self.asdict(), limits=limits, now_ms=now_ms)
        if not isinstance(event, events.Impression):  # pragma: no cover - parser contract
            raise TypeError(f"expected an Impression, got {type(event).__name__}")
        return event

    @classmethod
    def from_event(cls, event: events.Impression) -> Impression:
        """Return the record of a plain event."""
        return cls(**event.to_dict())


class Click(faust.Record, namespace="mtlstream.Click", **_RECORD_OPTIONS):
    """A ``clicks`` record."""

    impression_id: str
    ts: int
    click_id: str | None = None

    def to_event(
        self, *, limits: DecodeLimits = DEFAULT_LIMITS, now_ms: int | None = None
    ) -> events.Click:
        """Return the plain event, strictly validated (raises BadEventError)."""
        event = events.parse_event(events.CLICKS, self.asdict(), limits=limits, now_ms=now_ms)
        if not isinstance(event, events.Click):  # pragma: no cover - parser contract
            raise TypeError(f"expected a Click, got {type(event).__name__}")
        return event

    @classmethod
    def from_event(cls, event: events.Click) -> Click:
        """Return the record of a plain event."""
        return cls(**event.to_dict())


class FollowClick(faust.Record, namespace="mtlstream.FollowClick", **_RECORD_OPTIONS):
    """A ``follow_clicks`` record."""

    impression_id: str
    ts: int
    follow_id: str | None = None
    item_id: str | None = None

    def to_event(
        self, *, limits: DecodeLimits = DEFAULT_LIMITS, now_ms: int | None = None
    ) -> events.FollowClick:
        """Return the plain event, strictly validated (raises BadEventError)."""
        event = events.parse_event(
            events.FOLLOW_CLICKS, self.asdict(), limits=limits, now_ms=now_ms
        )
        if not isinstance(event, events.FollowClick):  # pragma: no cover - parser contract
            raise TypeError(f"expected a FollowClick, got {type(event).__name__}")
        return event

    @classmethod
    def from_event(cls, event: events.FollowClick) -> FollowClick:
        """Return the record of a plain event."""
        return cls(**event.to_dict())


class Sample(
    faust.Record,
    namespace="mtlstream.Sample",
    include_metadata=False,
    **_RECORD_OPTIONS,
):
    """A ``samples`` record: the plain JSON layout of :class:`stream.events.Sample`."""

    sample_id: str
    user_id: str
    item_id: str
    features: dict[str, Any]
    ts: int
    labels: dict[str, int]  # click, conversion, ysl
    masks: dict[str, int]  # ctr, cvr, ctcvr, ysl
    kind: str  # final | early | correction
    revision: int
    elapsed_ms: int
    emitted_at: int

    def to_event(self) -> events.Sample:
        """Return the plain sample, strictly validated (raises BadEventError)."""
        return events.Sample.from_dict(self.asdict())

    @classmethod
    def from_event(cls, sample: events.Sample) -> Sample:
        """Return the record of a plain sample."""
        return cls(**sample.to_dict())


class DeadLetter(faust.Record, namespace="mtlstream.DeadLetter", **_RECORD_OPTIONS):
    """A ``dead_letters`` record; ``raw`` is the rejected value as base64."""

    topic: str
    partition: int
    offset: int
    raw: str
    reason: str

    def to_event(self) -> events.DeadLetter:
        """Return the plain dead letter."""
        return events.DeadLetter(
            topic=self.topic,
            partition=self.partition,
            offset=self.offset,
            raw=self.raw,
            reason=self.reason,
        )

    @classmethod
    def from_event(cls, letter: events.DeadLetter) -> DeadLetter:
        """Return the record of a plain dead letter."""
        return cls(**letter.to_dict())
