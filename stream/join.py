"""The join decision: one pure function from (state, event, watermark) to samples.

Everything here is event time. A key's :class:`JoinState` holds the facts seen so far
(the impression, the first in-window click, every follow-on click by dedupe key, and
clicks or follow-ons that arrived before their impression); labels are computed from
those facts only when a sample is emitted, so they do not depend on arrival order.

Lifecycle of one impression id (DESIGN.md section 3)::

    pending (no impression yet) --impression--> open --watermark > early point--> early
       |                                          |                               |
       +-- watermark > ts + orphan_wait: orphans  +--------watermark > window end-+
                                                  v
                                          final (a small tombstone that recognises late
                                          events) --watermark > end + lateness--> None

The worker keeps ``result.state`` in its table (``state.to_dict()``), sends the samples,
dead-letters the orphans, and registers :func:`deadline` in a
:class:`stream.watermark.DeadlineIndex` so that it only ticks keys that are due.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias

from stream.errors import BadStateError
from stream.events import (
    Click,
    Event,
    Features,
    FollowClick,
    Impression,
    Labels,
    Masks,
    Sample,
    SampleKind,
    YslSpace,
    sample_id_for,
)

__all__ = [
    "EARLY",
    "FINAL",
    "OPEN",
    "JoinConfig",
    "JoinResult",
    "JoinState",
    "Mode",
    "Orphan",
    "deadline",
    "step",
]

MINUTE_MS: Final = 60_000

Mode: TypeAlias = Literal["final", "early"]

OPEN: Final = 0  # impression known, nothing emitted yet
EARLY: Final = 1  # early mode: the provisional sample went out, the window is still open
FINAL: Final = 2  # the window closed: a tombstone that only recognises late events

_STATE_VERSION: Final = 1
_LabelTuple: TypeAlias = tuple[int, int, int]  # (click, conversion, ysl)


@dataclass(frozen=True, slots=True)
class JoinConfig:
    """Windows, lateness and emission mode of the join (all durations in event-time ms)."""

    click_window_ms: int = 30 * MINUTE_MS  # W_c: click counts iff imp.ts <= c.ts <= imp.ts+W_c
    follow_window_ms: int = 30 * MINUTE_MS  # W_f: from the first click, inclusive both ends
    allowed_lateness_ms: int = 60_000  # L: the watermark lag, and how long tombstones outlive
    mode: Mode = "final"  # "final": one sample at window end; "early": provisional + corrections
    early_wait_ms: int = 5 * MINUTE_MS  # early mode: provisional sample at imp.ts + this
    ysl_space: YslSpace = "clicked"  # ysl mask: clicked impressions only, or all
    orphan_wait_ms: int = 5 * MINUTE_MS  # a click waits this long (past its ts) for its impression
    max_tracked_ids: int = 64  # cap on click keys, follow-on keys and pending events per key

    def __post_init__(self) -> None:
        for name in ("click_window_ms", "follow_window_ms", "max_tracked_ids"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("allowed_lateness_ms", "orphan_wait_ms", "early_wait_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.mode not in ("final", "early"):
            raise ValueError(f"mode must be 'final' or 'early', got {self.mode!r}")
        if self.ysl_space not in ("clicked", "all"):
            raise ValueError(f"ysl_space must be 'clicked' or 'all', got {self.ysl_space!r}")
        shortest = min(self.click_window_ms, self.follow_window_ms)
        if self.mode == "early" and self.early_wait_ms >= shortest:
            # Otherwise a window could close before its provisional sample is due.
            raise ValueError(
                f"early_wait_ms ({self.early_wait_ms}) must be shorter than both windows "
                f"(click_window_ms={self.click_window_ms}, "
                f"follow_window_ms={self.follow_window_ms})"
            )


@dataclass(slots=True)
class JoinState:
    """What one impression id's key holds between events (JSON via to_dict/from_dict).

    ``imp_ts is None`` means only clicks or follow-ons arrived so far (they sit in
    ``pending``). The payload (user, item, features) is dropped from a final-mode
    tombstone, since nothing will be emitted from it again.
    """

    impression_id: str
    imp_ts: int | None = None  # impression event time; None while pending
    user_id: str | None = None
    item_id: str | None = None
    features: Features | None = None
    click_ts: int | None = None  # the first in-window click: anchors the follow-on window
    click_keys: list[str] = field(default_factory=list)  # dedupe keys of clicks seen
    follows: dict[str, int] = field(default_factory=dict)  # follow-on dedupe key -> ts
    pending: list[Click | FollowClick] = field(default_factory=list)  # before the impression
    phase: int = OPEN
    end_ts: int | None = None  # window end, frozen when the sample became final
    revision: int = -1  # revision of the last emitted sample, -1 before any
    sent: _LabelTuple | None = None  # labels of the last emitted sample
    sent_at: int = 0  # event time of the last emission

    def copy(self) -> JoinState:
        """Return a copy that shares nothing mutable with this one."""
        return JoinState(
            impression_id=self.impression_id,
            imp_ts=self.imp_ts,
            user_id=self.user_id,
            item_id=self.item_id,
            features=self.features,  # never mutated: shared with the impression and samples
            click_ts=self.click_ts,
            click_keys=list(self.click_keys),
            follows=dict(self.follows),
            pending=list(self.pending),
            phase=self.phase,
            end_ts=self.end_ts,
            revision=self.revision,
            sent=self.sent,
            sent_at=self.sent_at,
        )

    def to_dict(self) -> dict[str, Any]:
        """Return a compact JSON-ready dict (short keys: one is stored per live impression)."""
        out: dict[str, Any] = {"v": _STATE_VERSION, "id": self.impression_id, "ph": self.phase}
        if self.imp_ts is not None:
            out["ts"] = self.imp_ts
        if self.user_id is not None:
            out["u"] = self.user_id
            out["i"] = self.item_id
            out["f"] = self.features
        if self.click_ts is not None:
            out["c"] = self.click_ts
        if self.click_keys:
            out["ck"] = self.click_keys
        if self.follows:
            out["fo"] = self.follows
        if self.pending:
            out["p"] = [_pending_to_list(e) for e in self.pending]
        if self.end_ts is not None:
            out["e"] = self.end_ts
        if self.sent is not None:
            out["r"] = self.revision
            out["s"] = list(self.sent)
            out["sa"] = self.sent_at
        return out

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> JoinState:
        """Rebuild a state from :meth:`to_dict`; raise :class:`BadStateError` if malformed."""
        try:
            return cls._from_dict(obj)
        except (LookupError, TypeError, ValueError, AttributeError) as exc:
            raise BadStateError(f"cannot read join state: {exc!r}") from exc

    @classmethod
    def _from_dict(cls, obj: dict[str, Any]) -> JoinState:
        if obj.get("v") != _STATE_VERSION:
            raise BadStateError(f"join state version {obj.get('v')!r}, expected {_STATE_VERSION}")
        get = obj.get
        phase = int(obj["ph"])
        if phase not in (OPEN, EARLY, FINAL):
            raise ValueError(f"phase {phase}")
        imp_id = str(obj["id"])
        ts, c, e, sent = get("ts"), get("c"), get("e"), get("s")
        # one is read per event and per deadline: skip the conversions of absent fields
        ck, fo, pending = get("ck"), get("fo"), get("p")
        return cls(
            impression_id=imp_id,
            imp_ts=None if ts is None else int(ts),
            user_id=get("u"),
            item_id=get("i"),
            features=get("f"),
            click_ts=None if c is None else int(c),
            click_keys=[str(k) for k in ck] if ck else [],
            follows={str(k): int(v) for k, v in fo.items()} if fo else {},
            pending=[_pending_from_list(imp_id, item) for item in pending] if pending else [],
            phase=phase,
            end_ts=None if e is None else int(e),
            revision=int(get("r", -1)),
            sent=None if sent is None else (int(sent[0]), int(sent[1]), int(sent[2])),
            sent_at=int(get("sa", 0)),
        )


@dataclass(frozen=True, slots=True)
class Orphan:
    """An event the join gives up on; the caller dead-letters it with ``reason``."""

    event: Event
    # "orphan": no impression within orphan_wait_ms; "orphan_overflow": too many waiting;
    # "late_impression": the impression came after its whole window and lateness.
    reason: str


@dataclass(slots=True)
class JoinResult:
    """The outcome of one :func:`step`."""

    state: JoinState | None  # what to store for the key; None: delete it
    samples: list[Sample]  # to send, in order
    orphans: list[Orphan]  # to dead-letter
    # Anomalies seen in this step, e.g. duplicate_click, out_of_window_follow, late_click,
    # orphan, overflow, late_impression. Only non-zero counts are present.
    counters: dict[str, int]


class _Out:
    """Mutable accumulator for one step (kept off the public result until the end)."""

    __slots__ = ("config", "counters", "now_ms", "orphans", "samples")

    def __init__(self, config: JoinConfig, now_ms: int) -> None:
        self.config = config
        self.now_ms = now_ms
        self.samples: list[Sample] = []
        self.orphans: list[Orphan] = []
        self.counters: dict[str, int] = {}

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n


def step(
    state: JoinState | None,
    event: Event | None,
    watermark: int,
    config: JoinConfig,
    *,
    now_ms: int,
) -> JoinResult:
    """Apply one event (or, with ``event=None``, a watermark tick) to one key's state.

    Pure: ``state`` is not modified; the new state is in the result.

    Parameters
    ----------
    state
        The key's stored state, None if the key holds nothing.
    event
        The event to apply, keyed by the same impression id; None to only advance time.
    watermark
        The partition's watermark (max event times minus lateness, see
        :class:`stream.watermark.WatermarkTracker`); a sample is final once the
        watermark is past its window end.
    config
        Windows and mode.
    now_ms
        Wall clock stamped on emitted samples as ``emitted_at``.

    Examples
    --------
    >>> cfg = JoinConfig()
    >>> imp = Impression("imp-1", "r1", "u1", "i1", ts=1_700_000_000_000, position=0)
    >>> r = step(None, imp, watermark=imp.ts, config=cfg, now_ms=0)
    >>> r = step(r.state, Click("imp-1", ts=imp.ts + 5_000), imp.ts, cfg, now_ms=0)
    >>> r.samples, deadline(r.state, cfg) - imp.ts  # final once watermark > click + W_f
    ([], 1805001)
    >>> r = step(r.state, None, watermark=imp.ts + 1_805_001, config=cfg, now_ms=0)
    >>> r.samples[0].labels, r.samples[0].kind
    (Labels(click=1, conversion=0, ysl=0), 'final')
    """
    out = _Out(config, now_ms)
    st = None if state is None else state.copy()
    if event is not None:
        if state is not None and event.impression_id != state.impression_id:
            raise ValueError(
                f"event for {event.impression_id!r} applied to the state of {state.impression_id!r}"
            )
        st = _apply(st, event, watermark, out)
    if st is not None:
        st = _advance(st, watermark, out)
    return JoinResult(state=st, samples=out.samples, orphans=out.orphans, counters=out.counters)


def deadline(state: JoinState | None, config: JoinConfig) -> int | None:
    """Return the smallest watermark at which a tick changes this state (None: never).

    The worker ticks the key (``step(state, None, watermark, ...)``) once its watermark
    reaches this value; ticking earlier is harmless and does nothing.
    """
    if state is None:
        return None
    if state.imp_ts is None:
        if not state.pending:
            return None
        return min(e.ts for e in state.pending) + config.orphan_wait_ms + 1
    if state.phase == FINAL:
        return _end(state, config) + config.allowed_lateness_ms + 1
    due = _end(state, config) + 1
    if config.mode == "early" and state.phase == OPEN:
        due = min(due, state.imp_ts + config.early_wait_ms + 1)
    return due


# --- applying events --------------------------------------------------------------------


def _apply(st: JoinState | None, event: Event, watermark: int, out: _Out) -> JoinState | None:
    if isinstance(event, Impression):
        return _on_impression(st, event, watermark, out)
    if st is None:
        st = JoinState(impression_id=event.impression_id)
    if st.imp_ts is None:
        _pend(st, event, out)
    elif isinstance(event, Click):
        _on_click(st, event, out)
    else:
        _on_follow(st, event, out)
    return st


def _on_impression(
    st: JoinState | None, imp: Impression, watermark: int, out: _Out
) -> JoinState | None:
    cfg = out.config
    shortest_end = imp.ts + min(cfg.click_window_ms, cfg.follow_window_ms)
    if st is None and watermark > shortest_end + cfg.allowed_lateness_ms:
        # Past the point where its tombstone may already be gone: either a very late
        # duplicate or an impression whose clicks were already orphaned. Emitting a
        # sample now could repeat a sample_id or be a certain false negative.
        out.count("late_impression")
        out.orphans.append(Orphan(imp, "late_impression"))
        return None
    if st is None:
        st = JoinState(impression_id=imp.impression_id)
    if st.imp_ts is not None:
        out.count("duplicate_impression")
        return st
    st.imp_ts = imp.ts
    st.user_id = imp.user_id
    st.item_id = imp.item_id
    st.features = imp.features
    waiting, st.pending = st.pending, []
    for event in waiting:  # replay in arrival order, so dedupe stays first-wins
        if isinstance(event, Click):
            _on_click(st, event, out)
        else:
            _on_follow(st, event, out)
    return st


def _pend(st: JoinState, event: Click | FollowClick, out: _Out) -> None:
    key = _key(event)
    if any(_key(e) == key for e in st.pending):
        out.count("duplicate_click" if isinstance(event, Click) else "duplicate_follow")
    elif len(st.pending) >= out.config.max_tracked_ids:
        out.count("overflow")
        out.orphans.append(Orphan(event, "orphan_overflow"))
    else:
        st.pending.append(event)


def _on_click(st: JoinState, click: Click, out: _Out) -> None:
    cfg = out.config
    key = _click_key(click)
    if key in st.click_keys:
        out.count("duplicate_click")
        return
    if len(st.click_keys) < cfg.max_tracked_ids:
        st.click_keys.append(key)
    else:
        # Labels only need the earliest in-window click; we merely lose duplicate counting.
        out.count("overflow")
    imp_ts = _imp_ts(st)
    in_window = imp_ts <= click.ts <= imp_ts + cfg.click_window_ms
    if st.phase == FINAL:
        out.count("late_click")
        # After the window closed the anchor stays put; only early mode revisits an
        # unclicked impression (delayed-feedback correction).
        if cfg.mode == "early" and in_window and st.click_ts is None:
            st.click_ts = click.ts
            _maybe_correct(st, click.ts, out)
        return
    if not in_window:
        out.count("out_of_window_click")
        return
    if st.click_ts is None or click.ts < st.click_ts:
        st.click_ts = click.ts
    if st.phase == EARLY:
        _maybe_correct(st, click.ts, out)


def _on_follow(st: JoinState, follow: FollowClick, out: _Out) -> None:
    cfg = out.config
    key = _follow_key(follow)
    if key in st.follows:
        out.count("duplicate_follow")
        return
    if len(st.follows) >= cfg.max_tracked_ids:
        out.count("overflow")
        return
    # Keep every follow-on, even one outside the current window: a click that arrives
    # later with an earlier ts moves the anchor, and the labels must not depend on order.
    st.follows[key] = follow.ts
    if st.phase == FINAL:
        out.count("late_follow")
        if cfg.mode == "early":
            _maybe_correct(st, follow.ts, out)
    elif st.phase == EARLY:
        _maybe_correct(st, follow.ts, out)


def _maybe_correct(st: JoinState, trigger_ts: int, out: _Out) -> None:
    """Early mode: send a correction when a binary label turned positive since the last send."""
    sent = st.sent
    if sent is None:
        return
    labels = _labels(st, out.config)
    if labels[0] > sent[0] or labels[1] > sent[1]:
        _emit(st, "correction", labels, max(trigger_ts, st.sent_at), out)


# --- advancing time ---------------------------------------------------------------------


def _advance(st: JoinState, watermark: int, out: _Out) -> JoinState | None:
    cfg = out.config
    imp_ts = st.imp_ts
    if imp_ts is None:
        return _expire_pending(st, watermark, out)
    if st.phase == OPEN and cfg.mode == "early" and watermark > imp_ts + cfg.early_wait_ms:
        _emit(st, "early", _labels(st, cfg), imp_ts + cfg.early_wait_ms, out)
        st.phase = EARLY
    if st.phase != FINAL:
        end = _end(st, cfg)
        if watermark > end:
            _finalize(st, end, out)
    if st.phase == FINAL and watermark > _end(st, cfg) + cfg.allowed_lateness_ms:
        return None
    return st


def _expire_pending(st: JoinState, watermark: int, out: _Out) -> JoinState | None:
    wait = out.config.orphan_wait_ms
    keep: list[Click | FollowClick] = []
    for event in st.pending:
        if watermark > event.ts + wait:
            out.count("orphan")
            out.orphans.append(Orphan(event, "orphan"))
        else:
            keep.append(event)
    if not keep:
        return None
    st.pending = keep
    return st


def _finalize(st: JoinState, end: int, out: _Out) -> None:
    cfg = out.config
    labels = _labels(st, cfg)
    ignored = len(st.follows) - labels[2]
    if ignored:
        out.count("out_of_window_follow", ignored)
    if cfg.mode == "final":
        _emit(st, "final", labels, end, out)
        # Nothing is emitted from a final-mode tombstone again: keep it small.
        st.user_id = st.item_id = st.features = None
    elif labels != st.sent:
        _emit(st, "correction", labels, end, out)
    st.phase = FINAL
    st.end_ts = end


def _emit(st: JoinState, kind: SampleKind, labels: _LabelTuple, at: int, out: _Out) -> None:
    imp_ts = _imp_ts(st)
    revision = st.revision + 1
    lab, masks = _labels_and_masks(labels, out.config.ysl_space)
    out.samples.append(
        Sample(
            sample_id=sample_id_for(st.impression_id, revision),
            user_id=st.user_id or "",
            item_id=st.item_id or "",
            features=st.features if st.features is not None else {},
            ts=imp_ts,
            labels=lab,
            masks=masks,
            kind=kind,
            revision=revision,
            elapsed_ms=at - imp_ts,
            emitted_at=out.now_ms,
        )
    )
    st.revision = revision
    st.sent = labels
    st.sent_at = at


# --- small helpers ----------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _labels_and_masks(labels: _LabelTuple, ysl_space: YslSpace) -> tuple[Labels, Masks]:
    """The (immutable, few distinct) label and mask objects of a sample, built once each."""
    lab = Labels(click=labels[0], conversion=labels[1], ysl=labels[2])
    return lab, Masks.for_labels(lab, ysl_space)


def _labels(st: JoinState, cfg: JoinConfig) -> _LabelTuple:
    anchor = st.click_ts
    if anchor is None:
        return (0, 0, 0)
    hi = anchor + cfg.follow_window_ms
    ysl = 0
    for ts in st.follows.values():
        if anchor <= ts <= hi:
            ysl += 1
    return (1, 1 if ysl else 0, ysl)


def _end(st: JoinState, cfg: JoinConfig) -> int:
    if st.end_ts is not None:
        return st.end_ts
    if st.click_ts is not None:
        return st.click_ts + cfg.follow_window_ms
    return _imp_ts(st) + cfg.click_window_ms


def _click_key(click: Click) -> str:
    return "c" + click.click_id if click.click_id is not None else f"@{click.ts}"


def _follow_key(follow: FollowClick) -> str:
    if follow.follow_id is not None:
        return "f" + follow.follow_id
    return f"@{follow.ts}:{follow.item_id or ''}"


def _key(event: Click | FollowClick) -> str:
    if isinstance(event, Click):
        return "C" + _click_key(event)
    return "F" + _follow_key(event)


def _imp_ts(st: JoinState) -> int:
    """Return the impression time of a state that must have one."""
    if st.imp_ts is None:  # only a corrupt stored state gets here
        raise BadStateError(f"join state of {st.impression_id!r} lost its impression time")
    return st.imp_ts


def _pending_to_list(event: Click | FollowClick) -> list[Any]:
    if isinstance(event, Click):
        return ["c", event.ts, event.click_id]
    return ["f", event.ts, event.follow_id, event.item_id]


def _pending_from_list(impression_id: str, item: list[Any]) -> Click | FollowClick:
    if item[0] == "c":
        return Click(impression_id, int(item[1]), _opt_str(item[2]))
    if item[0] == "f":
        return FollowClick(impression_id, int(item[1]), _opt_str(item[2]), _opt_str(item[3]))
    raise ValueError(f"pending event tag {item[0]!r}")


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)
