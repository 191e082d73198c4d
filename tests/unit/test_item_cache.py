"""The optional item-row cache of the scorer: hits, misses, expiry, bounds."""

from __future__ import annotations

import pytest

from serving.features import ItemCache

FIELDS = ("item_price", "item_category")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rows_are_served_until_they_expire() -> None:
    clock = Clock()
    cache = ItemCache(ttl_s=2.0, clock=clock)
    rows, missing = cache.lookup(FIELDS, ["a", "b", "a"])
    assert rows == [None, None, None] and missing == ["a", "b"]  # each id read once
    cache.store(FIELDS, ["a", "b"], [[1.0, "c1"], None])  # b is unknown: cached as None
    clock.now += 1.9
    assert cache.lookup(FIELDS, ["b", "a", "c"]) == ([None, [1.0, "c1"], None], ["c"])
    clock.now += 0.2
    assert cache.lookup(FIELDS, ["a", "b"])[1] == ["a", "b"]


def test_other_fields_start_over() -> None:
    cache = ItemCache(ttl_s=10.0)
    cache.lookup(FIELDS, ["a"])
    cache.store(FIELDS, ["a"], [[1.0, "c1"]])
    assert cache.lookup(("item_price",), ["a"]) == ([None], ["a"])
    cache.store(FIELDS, ["a"], [[2.0, "c2"]])  # a late answer for the old fields is dropped
    assert len(cache) == 0


def test_the_cache_stays_bounded() -> None:
    clock = Clock()
    cache = ItemCache(ttl_s=1.0, max_items=3, clock=clock)
    cache.lookup(FIELDS, [])
    cache.store(FIELDS, ["a", "b"], [[1.0, "x"], [2.0, "y"]])
    clock.now += 2  # a and b expired: they make room
    cache.store(FIELDS, ["c", "d"], [[3.0, "z"], None])
    assert len(cache) == 2
    cache.store(FIELDS, ["e", "f"], [None, None])  # still over: start over
    assert len(cache) == 2


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        ItemCache(ttl_s=0)
    with pytest.raises(ValueError):
        ItemCache(ttl_s=1, max_items=0)
