"""JoinWorker with a dict table and an in-memory sink: hold-back, confirm, bad and misrouted."""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

from stream.events import DecodeLimits
from stream.join import JoinConfig
from stream.worker import JoinWorker

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
    assert worker.held_partitions() == [0]
    worker.confirm(0, table)
    assert table[b"a"] == open_state  # confirming before the acknowledgement changes nothing

    sink.ack_all()
    worker.confirm(0, table)
    assert orjson.loads(table[b"a"])["ph"] == 2  # the final-mode tombstone
    assert worker.held_partitions() == []


def test_confirm_of_an_unknown_partition_is_a_no_op() -> None:
    worker, table = _worker(), {b"x": b"1"}
    worker.confirm(7, table)
    assert table == {b"x": b"1"} and worker.held_partitions() == []


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
