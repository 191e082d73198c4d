"""The pure join core: label rules, arrival orders, boundaries, lateness, modes, oracle."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import orjson
import pytest

from stream.errors import BadEventError, BadStateError
from stream.events import (
    Click,
    DecodeLimits,
    Event,
    FollowClick,
    Impression,
    Labels,
    Masks,
    Sample,
    decode_event,
    encode_event,
    topic_of,
)
from stream.join import FINAL, JoinConfig, JoinResult, JoinState, Orphan, deadline, step
from stream.watermark import NO_WATERMARK, DeadlineIndex, WatermarkTracker
from tests.reference_join import ReferenceResult, reference_join

MIN = 60_000
T0 = 1_700_000_000_000
CFG = JoinConfig()  # W_c = W_f = 30 min, L = 60 s, orphan wait 5 min, final mode
W_C = CFG.click_window_ms
W_F = CFG.follow_window_ms
L = CFG.allowed_lateness_ms
EARLY = JoinConfig(mode="early", early_wait_ms=5 * MIN)
BIG = T0 + 10**12  # a watermark past everything
NOW = 42  # wall clock stamped on samples


def imp(ts: int = T0, imp_id: str = "imp-1") -> Impression:
    return Impression(imp_id, "req", "u1", "i1", ts, 0, {"user_segment": "s1", "item_price": 2.0})


def click(ts: int, click_id: str | None = None, imp_id: str = "imp-1") -> Click:
    return Click(imp_id, ts, click_id)


def follow(
    ts: int, follow_id: str | None = None, item: str | None = None, imp_id: str = "imp-1"
) -> FollowClick:
    return FollowClick(imp_id, ts, follow_id, item)


@dataclass
class Run:
    """Everything a sequence of steps on one key produced."""

    state: JoinState | None = None
    samples: list[Sample] = field(default_factory=list)
    orphans: list[Orphan] = field(default_factory=list)
    counters: Counter[str] = field(default_factory=Counter)

    def apply(self, event: Event | None, watermark: int, config: JoinConfig = CFG) -> JoinResult:
        before = _snapshot(self.state)
        result = step(self.state, event, watermark, config, now_ms=NOW)
        assert _snapshot(self.state) == before  # purity: the input state is untouched
        self.state = result.state
        self.samples += result.samples
        self.orphans += result.orphans
        self.counters.update(result.counters)
        return result


def _snapshot(state: JoinState | None) -> bytes:
    return orjson.dumps(None if state is None else state.to_dict())


def feed(
    events: Iterable[Event],
    config: JoinConfig = CFG,
    watermark: int = NO_WATERMARK,
    finish: bool = True,
) -> Run:
    run = Run()
    for event in events:
        run.apply(event, watermark, config)
    if finish:
        run.apply(None, BIG, config)
        assert run.state is None
    return run


def only_sample(run: Run) -> Sample:
    assert len(run.samples) == 1, run.samples
    return run.samples[0]


def orders(events: Sequence[Event]) -> Iterator[tuple[Event, ...]]:
    """Every arrival order of ``events``."""
    return itertools.permutations(events)


def labels(click_: int, conversion: int, ysl: int) -> Labels:
    return Labels(click=click_, conversion=conversion, ysl=ysl)


# --- every arrival order ----------------------------------------------------------------


def test_every_order_of_impression_click_and_three_follow_ons() -> None:
    c = T0 + 10_000
    events: list[Event] = [
        imp(),
        click(c, "c1"),
        follow(c + MIN, "f1"),
        follow(c + 2 * MIN, None, "i7"),
        follow(c + W_F + 1, "f3"),  # 1 ms past the follow-on window
    ]
    for order in orders(events):
        run = feed(order)
        sample = only_sample(run)
        assert sample.labels == labels(1, 1, 2)
        assert (sample.kind, sample.revision, sample.sample_id) == ("final", 0, "imp-1")
        assert sample.elapsed_ms == c + W_F - T0
        assert run.counters["out_of_window_follow"] == 1


def test_every_order_with_duplicates_counts_each_once() -> None:
    c = T0 + 10_000
    events: list[Event] = [
        imp(),
        click(c),
        follow(c + MIN, "f1"),
        follow(c + 2 * MIN, None, "i7"),
        imp(),  # duplicate impression
        click(c),  # duplicate click (no id: same ts)
        follow(c + 2 * MIN, None, "i7"),  # duplicate follow-on (no id: same ts and item)
    ]
    for order in orders(events):
        run = feed(order)
        assert only_sample(run).labels == labels(1, 1, 2)
        assert run.counters["duplicate_impression"] == 1
        assert run.counters["duplicate_click"] == 1
        assert run.counters["duplicate_follow"] == 1


def test_every_order_the_earliest_click_anchors_the_follow_window() -> None:
    early_click, late_click = T0 + MIN, T0 + 10 * MIN
    events: list[Event] = [
        imp(),
        click(late_click, "late"),
        click(early_click, "early"),
        follow(T0 + 5 * MIN, "only-early-anchor"),  # before the late click
        follow(early_click + W_F + MIN, "only-late-anchor"),  # past the early window
        follow(T0 + 20 * MIN, "both"),
    ]
    for order in orders(events):
        sample = only_sample(feed(order))
        assert sample.labels == labels(1, 1, 2)
        assert sample.elapsed_ms == early_click + W_F - T0


def test_follow_on_without_click_never_converts() -> None:
    for order in orders([imp(), follow(T0 + MIN, "f1")]):
        run = feed(order)
        sample = only_sample(run)
        assert sample.labels == labels(0, 0, 0)
        assert sample.masks == Masks(ctr=1, cvr=0, ctcvr=1, ysl=0)
        assert sample.elapsed_ms == W_C
        assert run.counters["out_of_window_follow"] == 1


def test_never_clicked_impression_is_a_negative_at_click_window_end() -> None:
    run = feed([imp()], finish=False)
    assert run.samples == [] and deadline(run.state, CFG) == T0 + W_C + 1
    run.apply(None, T0 + W_C)
    assert run.samples == []
    run.apply(None, T0 + W_C + 1)
    sample = only_sample(run)
    assert (sample.labels, sample.emitted_at, sample.features) == (
        labels(0, 0, 0),
        NOW,
        imp().features,
    )
    assert (sample.user_id, sample.item_id, sample.ts) == ("u1", "i1", T0)


# --- window boundaries (inclusive), 1 ms outside ----------------------------------------


@pytest.mark.parametrize(
    ("offset", "clicked"),
    [(0, 1), (1, 1), (W_C, 1), (-1, 0), (W_C + 1, 0), (-(10**9), 0), (10**11, 0)],
)
def test_click_window_is_inclusive(offset: int, clicked: int) -> None:
    for order in orders([imp(), click(T0 + offset)]):
        run = feed(order)
        assert only_sample(run).labels.click == clicked
        assert run.counters["out_of_window_click"] == 1 - clicked


@pytest.mark.parametrize(
    ("offset", "counted"),
    [(0, 1), (W_F, 1), (-1, 0), (W_F + 1, 0), (-(10**6), 0), (10**11, 0)],
)
def test_follow_window_is_inclusive_from_the_first_click(offset: int, counted: int) -> None:
    c = T0 + 7 * MIN
    for order in orders([imp(), click(c), follow(c + offset, "f")]):
        sample = only_sample(feed(order))
        assert sample.labels == labels(1, counted, counted)
        # An absurd follow-on never stretches the window end.
        assert sample.elapsed_ms == c + W_F - T0


def test_sample_is_final_once_the_watermark_passes_the_window_end_exactly_once() -> None:
    c = T0 + MIN
    run = feed([imp(), click(c)], finish=False)
    end = c + W_F
    assert deadline(run.state, CFG) == end + 1
    run.apply(None, end)
    assert run.samples == []
    run.apply(None, end + 1)
    assert len(run.samples) == 1 and run.state is not None and run.state.phase == FINAL
    assert deadline(run.state, CFG) == end + L + 1
    run.apply(None, end + L)  # the tombstone lives through the lateness
    run.apply(imp(), end + L)  # a late duplicate is recognised, not re-emitted
    assert run.state is not None and run.counters["duplicate_impression"] == 1
    run.apply(None, end + L + 1)
    assert run.state is None and len(run.samples) == 1


def test_final_mode_tombstone_is_small() -> None:
    run = feed([imp(), click(T0 + MIN, "c")], finish=False)
    run.apply(None, T0 + MIN + W_F + 1)
    assert run.state is not None
    stored = run.state.to_dict()
    assert "f" not in stored and "u" not in stored
    assert len(orjson.dumps(stored)) < 150


# --- late events ------------------------------------------------------------------------


def _finalized(config: JoinConfig, events: Sequence[Event]) -> tuple[Run, int]:
    """Feed events, then tick at each deadline until the sample is final; return the watermark."""
    run = feed(events, config, finish=False)
    watermark = NO_WATERMARK
    while run.state is not None and run.state.phase != FINAL:
        due = deadline(run.state, config)
        assert due is not None
        watermark = due
        run.apply(None, watermark, config)
    assert run.state is not None  # the tombstone outlives the window by the lateness
    return run, watermark


def test_final_mode_late_events_are_counted_and_change_nothing() -> None:
    run, wm = _finalized(CFG, [imp(), click(T0 + MIN, "c1")])
    sent = len(run.samples)
    run.apply(click(T0 + 30_000, "c0"), wm)  # earlier click: would move the anchor
    run.apply(follow(T0 + 2 * MIN, "f1"), wm)  # would convert
    run.apply(follow(T0 + 2 * MIN, "f1"), wm)  # and its duplicate
    run.apply(click(T0 + MIN, "c1"), wm)  # duplicate of the counted click
    assert len(run.samples) == sent and run.samples[0].labels == labels(1, 0, 0)
    assert run.counters["late_click"] == 1 and run.counters["late_follow"] == 1
    assert run.counters["duplicate_follow"] == 1 and run.counters["duplicate_click"] == 1


def test_events_after_the_tombstone_is_gone_become_orphans() -> None:
    run = feed([imp(), click(T0 + MIN, "c1")], finish=False)
    gone = T0 + MIN + W_F + L + 1
    run.apply(None, gone)
    assert run.state is None
    run.apply(follow(T0 + 2 * MIN, "late"), gone)
    assert run.state is None and [o.reason for o in run.orphans] == ["orphan"]
    run.apply(imp(), gone)  # a very late duplicate impression must not re-emit
    assert run.state is None and len(run.samples) == 1
    assert run.orphans[-1].reason == "late_impression"


def test_early_mode_sequence_with_corrections() -> None:
    run = feed([imp()], EARLY, finish=False)
    assert deadline(run.state, EARLY) == T0 + 5 * MIN + 1
    run.apply(None, T0 + 5 * MIN, EARLY)
    assert run.samples == []
    run.apply(None, T0 + 5 * MIN + 1, EARLY)
    early = only_sample(run)
    assert (early.kind, early.revision, early.labels) == ("early", 0, labels(0, 0, 0))
    assert early.elapsed_ms == 5 * MIN and early.sample_id == "imp-1"

    wm = T0 + 6 * MIN
    c = T0 + 8 * MIN
    run.apply(click(c, "c"), wm, EARLY)  # click turns positive: correction 1
    run.apply(follow(c + MIN, "f1"), wm, EARLY)  # conversion turns positive: correction 2
    run.apply(follow(c + 2 * MIN, "f2"), wm, EARLY)  # only ysl grows: nothing yet
    run.apply(follow(c + 2 * MIN, "f2"), wm, EARLY)  # duplicate: nothing
    kinds = [(s.kind, s.revision, s.sample_id, s.labels) for s in run.samples[1:]]
    assert kinds == [
        ("correction", 1, "imp-1#1", labels(1, 0, 0)),
        ("correction", 2, "imp-1#2", labels(1, 1, 1)),
    ]
    assert [s.elapsed_ms for s in run.samples[1:]] == [8 * MIN, 9 * MIN]

    run.apply(None, c + W_F + 1, EARLY)  # window end: ysl changed, so one last correction
    last = run.samples[-1]
    assert (last.kind, last.revision, last.labels) == ("correction", 3, labels(1, 1, 2))
    assert last.elapsed_ms == c + W_F - T0 and last.masks.ysl == 1

    run.apply(follow(c + 3 * MIN, "f3"), c + W_F + 1, EARLY)  # late, no label turns positive
    assert len(run.samples) == 4 and run.counters["late_follow"] == 1
    run.apply(None, BIG, EARLY)
    assert run.state is None and len(run.samples) == 4


def test_early_mode_nothing_more_if_nothing_changes() -> None:
    run = feed([imp(), click(T0 + MIN, "c")], EARLY, finish=False)
    run.apply(None, T0 + 5 * MIN + 1, EARLY)
    assert only_sample(run).labels == labels(1, 0, 0)
    run.apply(None, BIG, EARLY)
    assert len(run.samples) == 1 and run.state is None


def test_early_mode_late_click_after_final_produces_a_correction() -> None:
    run, wm = _finalized(EARLY, [imp(), follow(T0 + 3 * MIN, "f")])
    assert [s.kind for s in run.samples] == ["early"]
    late = T0 + 2 * MIN
    run.apply(click(late, "c"), wm, EARLY)
    correction = run.samples[-1]
    assert (correction.kind, correction.revision) == ("correction", 1)
    assert correction.labels == labels(1, 1, 1)  # the stored follow-on now counts
    assert correction.elapsed_ms == 5 * MIN  # never before the early sample in event time
    assert run.counters["late_click"] == 1
    run.apply(click(late, "c"), wm, EARLY)  # its duplicate: nothing
    assert len(run.samples) == 2 and run.counters["duplicate_click"] == 1


def test_early_and_final_emission_on_one_big_watermark_jump() -> None:
    run = feed([imp(), click(T0 + MIN), follow(T0 + 2 * MIN)], EARLY, finish=False)
    run.apply(None, BIG, EARLY)
    assert [(s.kind, s.labels) for s in run.samples] == [("early", labels(1, 1, 1))]
    assert run.state is None


def test_final_mode_never_emits_early_or_corrections() -> None:
    run = feed([imp(), click(T0 + MIN, "c")], finish=False)
    run.apply(None, T0 + 6 * MIN)
    assert run.samples == []


# --- orphans ----------------------------------------------------------------------------


def test_click_before_its_impression_waits_then_joins() -> None:
    c = click(T0 + MIN, "c")
    run = Run()
    run.apply(c, NO_WATERMARK)
    assert run.state is not None and run.state.imp_ts is None
    assert deadline(run.state, CFG) == c.ts + CFG.orphan_wait_ms + 1
    run.apply(imp(), c.ts + CFG.orphan_wait_ms)  # just in time
    run.apply(None, BIG)
    assert only_sample(run).labels.click == 1 and run.orphans == []


def test_orphans_expire_by_event_time() -> None:
    run = Run()
    run.apply(follow(T0, "f"), NO_WATERMARK)
    run.apply(click(T0 + MIN, "c"), NO_WATERMARK)
    run.apply(click(T0 + MIN, "c"), NO_WATERMARK)  # duplicates wait once
    run.apply(None, T0 + CFG.orphan_wait_ms)
    assert run.orphans == []
    run.apply(None, T0 + CFG.orphan_wait_ms + 1)
    assert [o.event for o in run.orphans] == [follow(T0, "f")]
    assert run.state is not None  # the click still waits
    run.apply(None, T0 + MIN + CFG.orphan_wait_ms + 1)
    assert [o.reason for o in run.orphans] == ["orphan", "orphan"] and run.state is None
    assert run.counters["orphan"] == 2 and run.counters["duplicate_click"] == 1


def test_pending_events_are_bounded() -> None:
    config = JoinConfig(max_tracked_ids=3)
    run = Run()
    for k in range(5):
        run.apply(click(T0 + k, f"c{k}"), NO_WATERMARK, config)
    assert run.state is not None and len(run.state.pending) == 3
    assert [o.reason for o in run.orphans] == ["orphan_overflow"] * 2


def test_follow_ons_past_the_cap_are_not_counted() -> None:
    config = JoinConfig(max_tracked_ids=4)
    c = T0 + MIN
    events: list[Event] = [imp(), click(c)]
    events += [follow(c + k, f"f{k}") for k in range(10)]
    run = feed(events, config)
    assert only_sample(run).labels.ysl == 4 and run.counters["overflow"] == 6


# --- masks, config, state ---------------------------------------------------------------


@pytest.mark.parametrize(("space", "unclicked_ysl_mask"), [("clicked", 0), ("all", 1)])
def test_ysl_space(space: str, unclicked_ysl_mask: int) -> None:
    config = JoinConfig(ysl_space="all" if space == "all" else "clicked")
    unclicked = only_sample(feed([imp()], config))
    assert unclicked.masks == Masks(ctr=1, cvr=0, ctcvr=1, ysl=unclicked_ysl_mask)
    clicked = only_sample(feed([imp(), click(T0 + 1)], config))
    assert clicked.masks == Masks(ctr=1, cvr=1, ctcvr=1, ysl=1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"click_window_ms": 0},
        {"follow_window_ms": -1},
        {"allowed_lateness_ms": -1},
        {"orphan_wait_ms": -5},
        {"max_tracked_ids": 0},
        {"mode": "eventually"},
        {"ysl_space": "some"},
        {"mode": "early", "early_wait_ms": 30 * MIN},
        {"mode": "early", "early_wait_ms": 10 * MIN, "follow_window_ms": 10 * MIN},
    ],
)
def test_config_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        JoinConfig(**kwargs)  # type: ignore[arg-type]  # deliberately invalid values


def test_step_rejects_an_event_for_another_key() -> None:
    state = feed([imp()], finish=False).state
    with pytest.raises(ValueError, match="imp-2"):
        step(state, click(T0, imp_id="imp-2"), NO_WATERMARK, CFG, now_ms=0)


def test_state_round_trips_through_json() -> None:
    run = Run()
    run.apply(click(T0 + MIN, "c"), NO_WATERMARK, EARLY)
    run.apply(follow(T0 + 2 * MIN, None, "i9"), NO_WATERMARK, EARLY)
    for extra in [None, imp(), click(T0 + 3 * MIN)]:
        if extra is not None:
            run.apply(extra, NO_WATERMARK, EARLY)
        for wm in (NO_WATERMARK, T0 + 6 * MIN, T0 + MIN + W_F + 1):
            result = step(run.state, None, wm, EARLY, now_ms=NOW)
            if result.state is not None:
                raw = orjson.dumps(result.state.to_dict())
                assert JoinState.from_dict(orjson.loads(raw)) == result.state


@pytest.mark.parametrize(
    "broken",
    [
        {},
        {"v": 99, "id": "x", "ph": 0},
        {"v": 1, "id": "x", "ph": 7},
        {"v": 1, "id": "x", "ph": 0, "fo": [1, 2]},
        {"v": 1, "id": "x", "ph": 0, "p": [["z", 1]]},
        {"v": 1, "id": "x", "ph": 0, "s": [1]},
    ],
)
def test_state_from_dict_rejects_garbage(broken: dict[str, object]) -> None:
    with pytest.raises(BadStateError):
        JoinState.from_dict(broken)


# --- the streaming core against the batch oracle ----------------------------------------

NOW_DECODE = T0 + 10**10  # the decoder's wall clock for the randomized logs


@dataclass
class Stream:
    """A one-partition worker loop around the pure core, as the faust agent will run it."""

    config: JoinConfig
    roundtrip: bool  # store states as JSON between steps, like a faust Table
    states: dict[str, JoinState | bytes] = field(default_factory=dict)
    index: DeadlineIndex = field(default_factory=DeadlineIndex)
    samples: list[Sample] = field(default_factory=list)
    orphans: list[Orphan] = field(default_factory=list)
    counters: Counter[str] = field(default_factory=Counter)

    def load(self, key: str) -> JoinState | None:
        stored = self.states.get(key)
        if isinstance(stored, bytes):
            return JoinState.from_dict(orjson.loads(stored))
        return stored

    def apply(self, key: str, event: Event | None, watermark: int) -> None:
        state = self.load(key)
        result = step(state, event, watermark, self.config, now_ms=NOW)
        if event is None:  # a due tick must do something, else the deadline was early
            assert result.samples or result.orphans or result.state != state
        if event is None and state is not None and state.phase == FINAL:
            # what JoinWorker relies on to drop a due final state without reading it
            assert result.state is None and not result.samples and not result.orphans
            assert not result.counters
        self.samples += result.samples
        self.orphans += result.orphans
        self.counters.update(result.counters)
        new = result.state
        due = deadline(new, self.config)
        if new is None:
            self.states.pop(key, None)
        else:
            self.states[key] = orjson.dumps(new.to_dict()) if self.roundtrip else new
        self.index.set(key, due)
        if due is not None:  # and a tick just before it must do nothing (not late either)
            assert due > watermark
            quiet = step(new, None, due - 1, self.config, now_ms=NOW)
            assert not quiet.samples and not quiet.orphans and quiet.state == new

    def run(self, log: Sequence[tuple[str, bytes]]) -> None:
        tracker = WatermarkTracker(
            allowed_lateness_ms=self.config.allowed_lateness_ms, idle_timeout_ms=10**15
        )
        for n, (topic, raw) in enumerate(log):
            try:
                event = decode_event(topic, raw, now_ms=NOW_DECODE)
            except BadEventError:
                tracker.observe(topic, 0, None, now_ms=n)
                self.counters["bad_event"] += 1
                continue
            tracker.observe(topic, 0, event.ts, now_ms=n)
            watermark = tracker.watermark(0, now_ms=n)
            self.apply(event.impression_id, event, watermark)
            for key in self.index.pop_due(watermark):
                self.apply(key, None, watermark)
        for key in self.index.pop_due(BIG):  # the end of the log: every input goes idle
            self.apply(key, None, BIG)
        assert not self.states and not len(self.index)


def _garbage(rng: random.Random, ts: int) -> tuple[str, bytes]:
    topic = rng.choice(["impressions", "clicks", "follow_clicks"])
    raw = rng.choice(
        [
            rng.randbytes(rng.randrange(1, 40)),
            b'{"impression_id": "imp-0", "ts": "soon"}',
            orjson.dumps({"impression_id": "imp-0", "ts": True}),
            orjson.dumps({"impression_id": "imp-0", "ts": 5}),  # 1970
            orjson.dumps({"impression_id": "imp-0", "ts": NOW_DECODE + 10**9}),
            orjson.dumps({"impression_id": "", "ts": ts}),
            orjson.dumps([ts]),
        ]
    )
    return topic, raw


def _offset(rng: random.Random, window: int) -> int:
    """A delay that often lands on or next to the window's edges."""
    return rng.choice(
        [
            rng.randrange(0, window + 1),
            rng.randrange(0, window + 1),
            0,
            window,
            -1,
            window + 1,
            rng.randrange(-window, 3 * window),
        ]
    )


def _one_impression(rng: random.Random, i: int, ts: int, config: JoinConfig) -> list[Event]:
    imp_id = f"imp-{i}"
    events: list[Event] = [imp(ts, imp_id)]
    click_times = [
        ts + _offset(rng, config.click_window_ms) for _ in range(rng.choice([0, 0, 0, 1, 1, 2, 3]))
    ]
    for k, c in enumerate(click_times):
        events.append(click(c, rng.choice([None, f"c{i}.{k}"]), imp_id))
    anchor = rng.choice(click_times) if click_times else ts + rng.randrange(0, W_C)
    follow_window = config.follow_window_ms
    for k in range(rng.choice([0, 1, 2, 3]) if click_times else rng.choice([0, 0, 1])):
        follow_id = rng.choice([None, f"f{i}.{k}"])
        item = rng.choice([None, "next-1", "next-2"])
        events.append(follow(anchor + _offset(rng, follow_window), follow_id, item, imp_id))
    if rng.random() < 0.02:  # an impression that never comes: only orphans
        events = events[1:]
    return events


def make_log(rng: random.Random, n_impressions: int, config: JoinConfig) -> list[tuple[str, bytes]]:
    """Events in event-time order, shuffled within the allowed lateness, with junk."""
    timed: list[tuple[int, str, bytes]] = []
    ts = T0
    for i in range(n_impressions):
        ts += rng.randrange(0, 20_000)
        for event in _one_impression(rng, i, ts, config):
            copies = 2 if rng.random() < 0.1 else 1  # exact duplicates
            for _ in range(copies):
                timed.append((event.ts, topic_of(event), encode_event(event)))
        if rng.random() < 0.05:
            timed.append((ts, *_garbage(rng, ts)))
    # Sorting on ts + jitter in [0, L) moves each event less than L against event time.
    lateness = max(config.allowed_lateness_ms, 1)
    keyed = [
        (t + rng.randrange(0, lateness), n, topic, raw) for n, (t, topic, raw) in enumerate(timed)
    ]
    keyed.sort()
    return [(topic, raw) for _, _, topic, raw in keyed]


def _by_impression(samples: Iterable[Sample]) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = {}
    for s in samples:
        out.setdefault(s.impression_id, []).append(s)
    return out


def _check_final_mode(stream: Stream, ref: ReferenceResult) -> None:
    per_imp = _by_impression(stream.samples)
    assert per_imp.keys() == ref.labels.keys()
    for imp_id, samples in per_imp.items():
        assert len(samples) == 1
        s = samples[0]
        assert (s.kind, s.revision, s.sample_id) == ("final", 0, imp_id)
        assert s.labels == ref.labels[imp_id], imp_id
        assert s.masks == ref.masks[imp_id]
        assert s.ts + s.elapsed_ms == ref.window_end[imp_id]


def _check_early_mode(stream: Stream, ref: ReferenceResult) -> None:
    per_imp = _by_impression(stream.samples)
    assert per_imp.keys() == ref.labels.keys()
    for imp_id, samples in per_imp.items():
        assert samples[0].kind == "early" and samples[0].sample_id == imp_id
        assert [s.revision for s in samples] == list(range(len(samples)))
        assert all(s.kind == "correction" for s in samples[1:])
        for before, after in itertools.pairwise(samples):
            assert before.labels != after.labels  # nothing is re-sent unchanged
            assert after.elapsed_ms >= before.elapsed_ms
        assert samples[-1].labels == ref.labels[imp_id], imp_id
        assert samples[-1].masks == ref.masks[imp_id]


def _check_orphans(stream: Stream, ref: ReferenceResult) -> None:
    got = {(topic_of(o.event), o.event.impression_id, o.event.ts) for o in stream.orphans}
    assert set(ref.orphans) <= got
    wait = stream.config.orphan_wait_ms
    for topic, imp_id, ts in got - set(ref.orphans):
        # The only other orphans are out-of-window events: too early to wait for their
        # impression, or arriving after its tombstone went.
        assert topic != "impressions"
        assert ts < ref.impression_ts[imp_id] - wait or ts > ref.window_end[imp_id]
    assert stream.counters["late_impression"] == 0
    assert len({s.sample_id for s in stream.samples}) == len(stream.samples)


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
@pytest.mark.parametrize(
    ("config", "roundtrip"),
    [
        (CFG, False),
        (JoinConfig(ysl_space="all", orphan_wait_ms=0), True),
        (EARLY, True),
        (JoinConfig(mode="early", early_wait_ms=0, ysl_space="all"), False),
        (
            JoinConfig(click_window_ms=10 * MIN, follow_window_ms=3 * MIN, allowed_lateness_ms=5),
            False,
        ),
    ],
)
def test_streaming_core_matches_the_batch_oracle(
    seed: int, config: JoinConfig, roundtrip: bool
) -> None:
    rng = random.Random(seed)
    log = make_log(rng, 1_000, config)
    ref = reference_join(log, config, limits=DecodeLimits(), now_ms=NOW_DECODE)
    stream = Stream(config, roundtrip)
    stream.run(log)
    if config.mode == "final":
        _check_final_mode(stream, ref)
    else:
        _check_early_mode(stream, ref)
    _check_orphans(stream, ref)
    # The scenario generator really produced the hard cases.
    assert stream.counters["bad_event"] == ref.rejected > 0
    assert stream.counters["duplicate_click"] > 0 and stream.counters["duplicate_follow"] > 0
    assert stream.counters["out_of_window_click"] > 0
    assert stream.counters["out_of_window_follow"] > 0
    assert sum(lab.conversion for lab in ref.labels.values()) > 10
