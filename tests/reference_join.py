"""The oracle: a naive batch join over a whole event log, written straight from DESIGN.md 3.

It shares nothing with :mod:`stream.join` but the config and the decoder: it sees the
entire log at once, so it needs no watermark, state machine or arrival-order reasoning.
Dedupe is first-occurrence-wins by the documented keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from stream.errors import BadEventError
from stream.events import (
    Click,
    DecodeLimits,
    FollowClick,
    Impression,
    Labels,
    Masks,
    decode_event,
)
from stream.join import JoinConfig

__all__ = ["ReferenceResult", "reference_join"]


@dataclass
class ReferenceResult:
    """Per-impression truth for a log."""

    labels: dict[str, Labels] = field(default_factory=dict)
    masks: dict[str, Masks] = field(default_factory=dict)
    impression_ts: dict[str, int] = field(default_factory=dict)
    window_end: dict[str, int] = field(default_factory=dict)  # when each sample closes
    # (topic, impression_id, ts) of clicks / follow-ons whose impression never appears.
    orphans: list[tuple[str, str, int]] = field(default_factory=list)
    rejected: int = 0  # records the decoder refused


def reference_join(
    log: Iterable[tuple[str, bytes]],
    config: JoinConfig,
    *,
    limits: DecodeLimits | None = None,
    now_ms: int | None = None,
) -> ReferenceResult:
    """Join a whole log of (topic, raw value) records the slow, obvious way."""
    result = ReferenceResult()
    impressions: dict[str, Impression] = {}
    clicks: dict[str, list[Click]] = {}
    follows: dict[str, list[FollowClick]] = {}
    for topic, raw in log:
        try:
            event = decode_event(topic, raw, limits=limits or DecodeLimits(), now_ms=now_ms)
        except BadEventError:
            result.rejected += 1
            continue
        if isinstance(event, Impression):
            impressions.setdefault(event.impression_id, event)  # first one wins
        elif isinstance(event, Click):
            clicks.setdefault(event.impression_id, []).append(event)
        else:
            follows.setdefault(event.impression_id, []).append(event)

    for imp_id, imp in impressions.items():
        labels, end = _labels(imp, clicks.get(imp_id, []), follows.get(imp_id, []), config)
        result.labels[imp_id] = labels
        result.impression_ts[imp_id] = imp.ts
        result.window_end[imp_id] = end
        ysl_mask = 1 if config.ysl_space == "all" else labels.click
        result.masks[imp_id] = Masks(ctr=1, cvr=labels.click, ctcvr=1, ysl=ysl_mask)

    for topic, by_imp in (("clicks", clicks), ("follow_clicks", follows)):
        for imp_id, evs in by_imp.items():
            if imp_id not in impressions:
                result.orphans.extend((topic, imp_id, e.ts) for e in evs)
    return result


def _labels(
    imp: Impression, clicks: list[Click], follows: list[FollowClick], config: JoinConfig
) -> tuple[Labels, int]:
    # Dedupe first (first occurrence of a key wins), then apply the window rules.
    seen_clicks: dict[str, Click] = {}
    for c in clicks:
        seen_clicks.setdefault(c.click_id if c.click_id is not None else f"ts={c.ts}", c)
    in_window = [
        c.ts for c in seen_clicks.values() if imp.ts <= c.ts <= imp.ts + config.click_window_ms
    ]
    if not in_window:
        return Labels(click=0, conversion=0, ysl=0), imp.ts + config.click_window_ms

    first = min(in_window)
    seen_follows: dict[object, FollowClick] = {}
    for f in follows:
        key = ("id", f.follow_id) if f.follow_id is not None else ("ts", f.ts, f.item_id)
        seen_follows.setdefault(key, f)
    ysl = sum(1 for f in seen_follows.values() if first <= f.ts <= first + config.follow_window_ms)
    labels = Labels(click=1, conversion=int(ysl >= 1), ysl=ysl)
    return labels, first + config.follow_window_ms
