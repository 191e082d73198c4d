"""WatermarkTracker (min over topics, idleness, monotonic) and DeadlineIndex."""

from __future__ import annotations

import random

import pytest

from stream.watermark import NO_WATERMARK, DeadlineIndex, WatermarkTracker

L = 1_000
IDLE = 30_000
T0 = 1_700_000_000_000


def _tracker() -> WatermarkTracker:
    return WatermarkTracker(allowed_lateness_ms=L, idle_timeout_ms=IDLE)


def _feed(wm: WatermarkTracker, imp: int, click: int, follow: int, now: int = 0) -> None:
    wm.observe("impressions", 0, imp, now)
    wm.observe("clicks", 0, click, now)
    wm.observe("follow_clicks", 0, follow, now)


def test_min_over_topics_minus_lateness() -> None:
    wm = _tracker()
    _feed(wm, T0 + 500, T0 + 100, T0 + 900)
    assert wm.watermark(0, now_ms=0) == T0 + 100 - L
    wm.observe("clicks", 0, T0 + 50, 1)  # an older event does not move the max back
    assert wm.watermark(0, now_ms=1) == T0 + 100 - L
    wm.observe("clicks", 0, T0 + 2_000, 2)
    assert wm.watermark(0, now_ms=2) == T0 + 500 - L


def test_topic_read_ahead_does_not_advance_the_watermark() -> None:
    """A backlog replay of one topic must not finish samples early."""
    wm = _tracker()
    _feed(wm, T0, T0, T0)
    for k in range(100):
        wm.observe("impressions", 0, T0 + k * 60_000, now_ms=k)
    assert wm.watermark(0, now_ms=100) == T0 - L


def test_unseen_topic_holds_the_watermark_until_idle() -> None:
    wm = _tracker()
    wm.observe("impressions", 0, T0, now_ms=0)
    wm.observe("clicks", 0, T0 + 10, now_ms=0)
    assert wm.watermark(0, now_ms=IDLE) == NO_WATERMARK  # exactly the timeout: still held
    wm.observe("impressions", 0, T0 + 20, now_ms=IDLE)
    wm.observe("clicks", 0, T0 + 30, now_ms=IDLE)
    assert wm.watermark(0, now_ms=IDLE + 1) == T0 + 20 - L  # follow_clicks went idle


def test_idle_topic_stops_holding_back_and_all_idle_uses_everything() -> None:
    wm = _tracker()
    _feed(wm, T0 + 5_000, T0, T0 + 9_000, now=0)
    wm.observe("impressions", 0, T0 + 6_000, now_ms=20_000)
    wm.observe("follow_clicks", 0, T0 + 9_500, now_ms=20_000)
    assert wm.watermark(0, now_ms=IDLE) == T0 - L  # clicks not idle yet (== timeout)
    assert wm.watermark(0, now_ms=IDLE + 1) == T0 + 6_000 - L  # clicks idle
    assert wm.watermark(0, now_ms=20_000 + IDLE + 1) == T0 + 9_500 - L  # everything idle


def test_watermark_never_goes_backwards() -> None:
    wm = _tracker()
    _feed(wm, T0 + 5_000, T0, T0 + 5_000, now=0)
    wm.observe("impressions", 0, T0 + 6_000, now_ms=IDLE)
    wm.observe("follow_clicks", 0, T0 + 6_000, now_ms=IDLE)
    high = wm.watermark(0, now_ms=IDLE + 1)
    assert high == T0 + 6_000 - L
    wm.observe("clicks", 0, T0 + 10, now_ms=IDLE + 2)  # clicks wakes up, far behind
    assert wm.watermark(0, now_ms=IDLE + 2) == high
    wm.observe("clicks", 0, T0 + 8_000, now_ms=IDLE + 3)
    assert wm.watermark(0, now_ms=IDLE + 3) == high  # others still cap it at 6000 - L


def test_partitions_are_independent_and_revocable() -> None:
    wm = _tracker()
    _feed(wm, T0, T0, T0)
    assert wm.watermark(1, now_ms=0) == NO_WATERMARK
    wm.observe("clicks", 1, T0 + 100, now_ms=0)
    assert wm.watermark(0, now_ms=0) == T0 - L
    assert wm.watermark(1, now_ms=0) == NO_WATERMARK
    assert wm.partitions() == [0, 1]
    wm.revoke(0)
    assert wm.watermark(0, now_ms=0) == NO_WATERMARK and wm.partitions() == [1]


def test_record_without_event_time_keeps_a_topic_active() -> None:
    wm = _tracker()
    _feed(wm, T0 + 5_000, T0, T0 + 5_000, now=0)
    wm.observe("clicks", 0, None, now_ms=IDLE)  # e.g. a garbage record was read
    wm.observe("impressions", 0, T0 + 5_000, now_ms=IDLE)
    wm.observe("follow_clicks", 0, T0 + 5_000, now_ms=IDLE)
    assert wm.watermark(0, now_ms=IDLE + 1) == T0 - L


def test_tracker_validates() -> None:
    with pytest.raises(ValueError, match="idle_timeout_ms"):
        WatermarkTracker(idle_timeout_ms=0)
    with pytest.raises(ValueError, match="allowed_lateness_ms"):
        WatermarkTracker(allowed_lateness_ms=-1)
    with pytest.raises(ValueError, match="unknown topic"):
        _tracker().observe("samples", 0, T0, 0)


def test_watermark_matches_a_naive_model() -> None:
    """Random reads against a from-scratch recomputation of the definition."""
    rng = random.Random(7)
    topics = ("impressions", "clicks", "follow_clicks")
    wm = _tracker()
    history: dict[str, list[tuple[int, int]]] = {t: [] for t in topics}  # (now, ts)
    best = NO_WATERMARK
    now = 0
    start: int | None = None  # the partition's idle clocks start at its first read
    for _ in range(2_000):
        now += rng.choice([0, 1, 10, 1_000, IDLE // 2, IDLE + 1])
        start = now if start is None else start
        topic = rng.choice(topics)
        ts = T0 + rng.randrange(0, 100_000)
        wm.observe(topic, 0, ts, now)
        history[topic].append((now, ts))
        maxes = {t: max(ts for _, ts in h) for t, h in history.items() if h}
        last_read = {t: history[t][-1][0] if history[t] else start for t in topics}
        active = [t for t in topics if now - last_read[t] <= IDLE]
        if any(not history[t] for t in active):
            candidate = NO_WATERMARK
        elif active:
            candidate = min(maxes[t] for t in active) - L
        else:
            candidate = max(maxes.values()) - L
        best = max(best, candidate)
        assert wm.watermark(0, now) == best


# --- DeadlineIndex ----------------------------------------------------------------------


def test_deadline_index_pops_due_keys_in_order() -> None:
    idx = DeadlineIndex()
    idx.set("c", 30)
    idx.set("a", 10)
    idx.set("b", 20)
    assert idx.next_deadline() == 10
    assert idx.pop_due(9) == []
    assert idx.pop_due(20) == ["a", "b"]
    assert len(idx) == 1 and "c" in idx and idx.get("c") == 30
    assert idx.pop_due(10**9) == ["c"]
    assert idx.next_deadline() is None


def test_deadline_index_replaces_and_removes() -> None:
    idx = DeadlineIndex()
    idx.set("a", 10)
    idx.set("a", 50)  # moved later: the stale 10 must not fire
    idx.set("b", 5)
    idx.set("b", None)
    idx.set("c", 7)
    idx.discard("c")
    assert idx.pop_due(40) == []
    assert idx.next_deadline() == 50
    idx.set("a", 1)  # moved earlier
    assert idx.pop_due(1) == ["a"]
    assert idx.pop_due(100) == []


def test_deadline_index_matches_a_dict_and_stays_compact() -> None:
    rng = random.Random(3)
    idx = DeadlineIndex()
    model: dict[str, int] = {}
    watermark = 0
    for _ in range(20_000):
        op = rng.random()
        key = f"k{rng.randrange(200)}"
        if op < 0.6:
            deadline = watermark + rng.randrange(1, 500)
            idx.set(key, deadline)
            model[key] = deadline
        elif op < 0.7:
            idx.discard(key)
            model.pop(key, None)
        else:
            watermark += rng.randrange(0, 50)
            expected = sorted((d, k) for k, d in model.items() if d <= watermark)
            assert idx.pop_due(watermark) == [k for _, k in expected]
            for _, k in expected:
                del model[k]
        assert len(idx) == len(model)
    assert len(idx._heap) <= 2 * len(model) + 65  # lazy deletion does not leak


def test_restored_event_times_hold_until_idle_and_never_lower_what_was_read() -> None:
    wm = WatermarkTracker(allowed_lateness_ms=100, idle_timeout_ms=1_000)
    wm.observe("clicks", 3, ts=9_000, now_ms=0)
    wm.restore(3, {"impressions": 5_000, "clicks": 7_000, "unknown": 1}, now_ms=0)
    assert wm.event_times(3) == {"impressions": 5_000, "clicks": 9_000}
    assert wm.watermark(3, now_ms=500) == NO_WATERMARK  # follow_clicks is active, no time yet
    assert wm.watermark(3, now_ms=1_001) == 8_900  # all idle: the restored times are all there is
    assert wm.event_times(4) == {}
