"""JoinWorker with a dict table and an in-memory sink: hold-back, confirm, bad and misrouted."""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

from stream.events import DecodeLimits
from stream.join import JoinConfig
from stream.worker import JoinWorker, event_times_key

TOPICS = {"imp": "impressions", "clk": "clicks", "fol": "follow_clicks"}
CONFIG = JoinConfig(click_window_ms=10_000, follow_window_ms=10_000, allowed_lateness_ms=1_000)
T0 = 1_700_000_000_000
NOW = T0 + 3_600_000  # wall clock after every event: no future-skew rejections


@dataclass
class Ack:
    acked: bool = False

    def done(self) -> bool:
        return self.acked


@dataclass
class MemorySink:
    samples: list[tuple[bytes, bytes, Ack]] = field(default_factory=list)
    letters: list[dict[str, object]] = field(default_factory=list)
    forwarded: list[tuple[str, bytes]] = field(default_factory=list)

    def sample(self, key: bytes, value: bytes) -> Ack:
        ack = Ack()
        self.samples.append((key, value, ack))
        return ack

    def dead_letter(self, value: bytes) -> None:
        self.letters.append(orjson.loads(value))

    def forward(self, topic: str, key: bytes, value: bytes) -> None:
        self.forwarded.append((topic, key))

    def counter(self, item_id: str, kind: str, ts: int) -> None:
        pass

    def ack_all(self) -> None:
        for _, _, ack in self.samples:
            ack.acked = True


def _worker() -> JoinWorker:
    return JoinWorker(CONFIG, DecodeLimits(), TOPICS, idle_timeout_ms=60_000)


def _imp(imp_id: str, ts: int) -> bytes:
    fields = {"impression_id": imp_id, "request_id": "r", "user_id": "u", "item_id": "i"}
    return orjson.dumps({**fields, "ts": ts, "position": 0})


def _feed(
    worker: JoinWorker, table: dict[bytes, bytes], sink: MemorySink, imp_id: str, ts: int
) -> None:
    """The same impression event on all three inputs' clocks: one record per topic."""
    key = imp_id.encode()
    worker.on_record("imp", 0, 0, key, _imp(imp_id, ts), table=table, sink=sink, now_ms=NOW)
    click = orjson.dumps({"impression_id": imp_id, "ts": ts + 1, "click_id": f"{imp_id}-c"})
    worker.on_record("clk", 0, 0, key, click, table=table, sink=sink, now_ms=NOW)


def test_emitted_state_is_held_back_until_its_sample_is_acknowledged() -> None:
    worker, sink = _worker(), MemorySink()
    table: dict[bytes, bytes] = {}
    _feed(worker, table, sink, "a", T0)
    open_state = table[b"a"]
    # a later impression moves every input's clock past a's window: a's sample is emitted
    _feed(worker, table, sink, "b", T0 + 12_000)
    worker.on_record(
        "fol",
        0,
        0,
        b"b",
        orjson.dumps({"impression_id": "b", "ts": T0 + 12_002}),
        table=table,
        sink=sink,
        now_ms=NOW,
    )
    assert [key for key, _, _ in sink.samples] == [b"a"]
    assert table[b"a"] == open_state  # not acknowledged: the table still has the open state
    assert worker.unconfirmed_partitions() == [0]
    worker.confirm(0, table)
    assert table[b"a"] == open_state  # confirming before the acknowledgement changes nothing

    sink.ack_all()
    worker.confirm(0, table)
    assert orjson.loads(table[b"a"])["ph"] == 2  # the final-mode tombstone
    assert worker.unconfirmed_partitions() == []


def test_confirm_of_an_unknown_partition_is_a_no_op() -> None:
    worker, table = _worker(), {b"x": b"1"}
    worker.confirm(7, table)
    assert table == {b"x": b"1"} and worker.unconfirmed_partitions() == []


def test_bad_input_is_dead_lettered_and_misrouted_input_forwarded() -> None:
    worker, sink = _worker(), MemorySink()
    table: dict[bytes, bytes] = {}
    worker.on_record("imp", 0, 41, b"k", b"{not json", table=table, sink=sink, now_ms=NOW)
    no_ts = orjson.dumps({"impression_id": "z", "click_id": "c"})
    worker.on_record("clk", 0, 42, b"z", no_ts, table=table, sink=sink, now_ms=NOW)
    worker.on_record("imp", 0, 43, b"misrouted", _imp("z", T0), table=table, sink=sink, now_ms=NOW)
    assert [(d["offset"], d["reason"]) for d in sink.letters][:1] == [(41, "invalid_json")]
    assert [d["offset"] for d in sink.letters] == [41, 42]
    assert sink.forwarded == [("imp", b"z")]
    assert table == {}


def test_a_new_owner_finishes_recovered_keys_with_the_event_times_it_restores() -> None:
    # The previous owner read (and committed) every record, then lost the partition before its
    # inputs went idle: nothing is left to read, so only the saved event times can close "a".
    first, sink = _worker(), MemorySink()
    table: dict[bytes, bytes] = {}
    _feed(first, table, sink, "a", T0)
    _feed(first, table, sink, "b", T0 + 12_000)  # past a's window, but follow_clicks has no time
    assert sink.samples == []
    assert first.unconfirmed_partitions() == [0]  # event times not written yet
    first.confirm(0, table)
    assert first.unconfirmed_partitions() == []
    saved = orjson.loads(table[event_times_key(0)])
    assert saved == {"pt": 0, "event_times": {"impressions": T0 + 12_000, "clicks": T0 + 12_001}}

    second, sink2 = _worker(), MemorySink()
    second.on_tick(0, table=table, sink=sink2, now_ms=NOW)  # recovers the keys; inputs active
    assert sink2.samples == []
    second.on_tick(0, table=table, sink=sink2, now_ms=NOW + 60_001)  # every input idle now
    assert [key for key, _, _ in sink2.samples] == [b"a"]
    assert second.unconfirmed_partitions() == [0]  # a's sample is not acknowledged yet

    # without the saved times the same table never closes "a": the bug this guards against
    del table[event_times_key(0)]
    third, sink3 = _worker(), MemorySink()
    third.on_tick(0, table=table, sink=sink3, now_ms=NOW)
    third.on_tick(0, table=table, sink=sink3, now_ms=NOW + 60_001)
    assert sink3.samples == []


def test_unreadable_event_times_are_skipped_and_other_partitions_ignored() -> None:
    worker, sink = _worker(), MemorySink()
    table = {event_times_key(0): b"{broken", event_times_key(1): b'{"event_times": {"clicks": 5}}'}
    worker.on_tick(0, table=table, sink=sink, now_ms=NOW)
    assert worker.tracker.event_times(0) == {}


def test_an_impression_id_in_the_reserved_key_space_is_dead_lettered() -> None:
    worker, sink = _worker(), MemorySink()
    table: dict[bytes, bytes] = {}
    raw = _imp("\x00event_times:0", T0)
    worker.on_record("imp", 0, 7, b"\x00event_times:0", raw, table=table, sink=sink, now_ms=NOW)
    assert [(d["offset"], d["reason"]) for d in sink.letters] == [(7, "bad_value:impression_id")]
    assert table == {}


def test_a_final_state_is_dropped_once_its_lateness_is_over() -> None:
    worker, sink = _worker(), MemorySink()
    table: dict[bytes, bytes] = {}

    def follow(imp_id: str, ts: int) -> None:
        raw = orjson.dumps({"impression_id": imp_id, "ts": ts})
        worker.on_record("fol", 0, 0, imp_id.encode(), raw, table=table, sink=sink, now_ms=NOW)

    _feed(worker, table, sink, "a", T0)
    _feed(worker, table, sink, "b", T0 + 12_000)
    follow("b", T0 + 12_002)  # a's window (click + 10 s) is over: final sample, tombstone
    sink.ack_all()
    worker.confirm(0, table)
    assert orjson.loads(table[b"a"])["ph"] == 2
    follow("a", T0 + 11_500)  # late, but within the lateness: recognised, counted, no sample
    assert dict(worker.metrics.anomalies) == {"late_follow": 1}
    assert [key for key, _, _ in sink.samples] == [b"a"]
    _feed(worker, table, sink, "c", T0 + 13_500)  # watermark past a's end + 1 s lateness
    follow("c", T0 + 13_502)
    assert b"a" not in table and b"b" in table
    assert [key for key, _, _ in sink.samples] == [b"a"]  # dropping it emitted nothing


def test_a_recovered_final_state_is_dropped_too() -> None:
    worker, sink = _worker(), MemorySink()
    table: dict[bytes, bytes] = {}
    _feed(worker, table, sink, "a", T0)
    _feed(worker, table, sink, "b", T0 + 12_000)
    fol = orjson.dumps({"impression_id": "b", "ts": T0 + 12_002})
    worker.on_record("fol", 0, 0, b"b", fol, table=table, sink=sink, now_ms=NOW)
    sink.ack_all()
    worker.confirm(0, table)
    assert orjson.loads(table[b"a"])["ph"] == 2  # a's tombstone, b still open

    second, sink2 = _worker(), MemorySink()
    second.on_tick(0, table=table, sink=sink2, now_ms=NOW)  # recovers a (final) and b (open)
    assert b"a" in table
    # all idle: the watermark is the last event time read, past a's end + lateness, not b's end
    second.on_tick(0, table=table, sink=sink2, now_ms=NOW + 60_001)
    assert b"a" not in table and b"b" in table
    assert sink2.samples == []  # a dropped without a sample again
