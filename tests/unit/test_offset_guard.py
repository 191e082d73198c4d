"""The faust engine's guard against skipped and replayed input records (pure logic)."""

from __future__ import annotations

from stream.gaps import Admission, OffsetGuard

APPLY = Admission(apply=True, missing_from=None)
REPLAY = Admission(apply=False, missing_from=None)


def test_in_order_records_apply_and_the_first_of_a_partition_sets_the_expectation() -> None:
    guard = OffsetGuard()
    assert guard.admit("clicks", 0, 553) == APPLY
    assert [guard.admit("clicks", 0, o) for o in (554, 555)] == [APPLY, APPLY]
    assert guard.admit("clicks", 1, 7) == APPLY  # partitions are independent
    assert guard.expected == {("clicks", 0): 556, ("clicks", 1): 8}


def test_a_record_behind_the_expectation_is_a_replay_and_changes_nothing() -> None:
    guard = OffsetGuard()
    for offset in range(10, 20):
        guard.admit("impressions", 2, offset)
    # faust sought back to the committed offset 12: 12..19 were applied already
    assert [guard.admit("impressions", 2, o) for o in range(12, 20)] == [REPLAY] * 8
    assert guard.admit("impressions", 2, 20) == APPLY


def test_a_record_beyond_the_expectation_names_the_skipped_range() -> None:
    guard = OffsetGuard()
    guard.admit("impressions", 2, 790)
    assert guard.admit("impressions", 2, 792) == Admission(apply=True, missing_from=791)
    assert guard.admit("impressions", 2, 793) == APPLY
    # the same topic name on another partition, or another topic, is not affected
    assert guard.admit("clicks", 2, 0) == APPLY


def test_retain_forgets_revoked_partitions_so_they_start_afresh() -> None:
    guard = OffsetGuard()
    for topic in ("impressions", "clicks"):
        for partition in (0, 1, 2):
            guard.admit(topic, partition, 100)
    guard.retain({1})
    assert set(guard.expected) == {("impressions", 1), ("clicks", 1)}
    # a revoked partition that comes back is read from its committed offset: no replay verdict
    assert guard.admit("impressions", 0, 50) == APPLY
    assert guard.admit("impressions", 1, 50) == REPLAY


def test_stalled_names_the_range_when_commits_stand_still_behind() -> None:
    guard = OffsetGuard(stall_s=3.0)
    tp = ("impressions", 0)
    for offset in range(502, 949):
        guard.admit(*tp, offset)
    assert guard.stalled(tp, 507, now=100.0) is None  # marks 949
    assert guard.stalled(tp, 507, now=102.9) is None  # not long enough
    assert guard.stalled(tp, 507, now=103.0) == range(507, 949)
    assert guard.stalled(tp, 507, now=104.0) is None  # marked again: asked after another 3 s
    assert guard.stalled(tp, 507, now=106.0) == range(507, 949)


def test_stalled_names_the_range_when_commits_crawl() -> None:
    # after a bad recovery faust may commit one offset per commit interval
    guard = OffsetGuard(stall_s=3.0)
    tp = ("impressions", 1)
    for offset in range(553, 1005):
        guard.admit(*tp, offset)
    assert [guard.stalled(tp, 553 + i, now=float(i)) for i in range(3)] == [None] * 3
    assert guard.stalled(tp, 556, now=3.0) == range(556, 1005)


def test_stalled_stays_quiet_while_commits_keep_up() -> None:
    guard = OffsetGuard(stall_s=3.0)
    tp = ("clicks", 1)
    expected = 30
    for second in range(20):
        for _ in range(50):  # 50 records a second, committed a second later
            guard.admit(*tp, expected)
            expected += 1
        assert guard.stalled(tp, expected - 50, now=float(second)) is None
    assert guard.stalled(tp, expected, now=100.0) is None  # all committed
    assert guard.stalled(tp, None, now=300.0) is None  # faust has not committed at all
    assert guard.stalled(("clicks", 9), 3, now=400.0) is None  # a partition never seen


def test_stalled_never_commits_offsets_before_the_first_one_applied() -> None:
    guard = OffsetGuard(stall_s=1.0)
    tp = ("impressions", 3)
    for offset in range(600, 700):
        guard.admit(*tp, offset)
    # faust says 550 is committed, but 550..599 never reached the worker in this assignment
    assert guard.stalled(tp, 550, now=0.0) is None
    assert guard.stalled(tp, 550, now=60.0) is None
