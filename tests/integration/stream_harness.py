"""Helpers to run the real stream worker against the real broker in tests and benchmarks."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

from stream.events import CLICKS, FOLLOW_CLICKS, IMPRESSIONS, Sample, decode_sample
from stream.join import JoinConfig
from stream.simulate import SimConfig, generate
from stream.topics import partition_for

REPO = Path(__file__).resolve().parents[2]
KINDS = (IMPRESSIONS, CLICKS, FOLLOW_CLICKS)

LogRecord = tuple[str, bytes, bytes]  # (kind, key, raw value)


@dataclass
class StreamEnv:
    """Unique topic names and an app id for one test, plus the worker's environment."""

    bootstrap: str
    redis_url: str
    workdir: Path
    partitions: int = 4
    extra: dict[str, str] = field(default_factory=dict)
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def topic(self, kind: str) -> str:
        return f"{kind}-{self.tag}"

    @property
    def namespace(self) -> str:
        return f"t{self.tag}:"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "REDIS_URL": self.redis_url,
            "MTL_NAMESPACE": self.namespace,
            "MTL_STREAM_APP_ID": f"stream-{self.tag}",
            "MTL_TOPIC_PARTITIONS": str(self.partitions),
            "MTL_IMPRESSIONS_TOPIC": self.topic(IMPRESSIONS),
            "MTL_CLICKS_TOPIC": self.topic(CLICKS),
            "MTL_FOLLOW_CLICKS_TOPIC": self.topic(FOLLOW_CLICKS),
            "MTL_SAMPLES_TOPIC": self.topic("samples"),
            "MTL_DEAD_LETTERS_TOPIC": self.topic("dead_letters"),
            "MTL_STREAM_DATA_DIR": str(self.workdir / "faust"),
            # the simulated clock starts in 2024: no future-skew check
            "MTL_MAX_FUTURE_SKEW_MS": "-1",
            "MTL_IDLE_TIMEOUT_MS": "1500",
            "MTL_TICK_INTERVAL_S": "0.5",
            "MTL_STREAM_LOG_EVERY_S": "2",
            **self.extra,
        }


class WorkerProc:
    """`mtlstream stream` as a subprocess, logging to a file."""

    def __init__(self, senv: StreamEnv, name: str = "worker") -> None:
        self.log = senv.workdir / f"{name}.log"
        self._fh = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mtlstream", "stream"],
            cwd=REPO,
            env=senv.env(),
            stdout=self._fh,
            stderr=subprocess.STDOUT,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if "Worker ready" in self.text() or "[^Worker]: Ready" in self.text():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"stream worker exited:\n{self.text()[-4000:]}")
            time.sleep(0.2)
        raise AssertionError(f"stream worker not ready in {timeout_s}s:\n{self.text()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self._fh.close()


def simulated_log(impressions: int, seed: int) -> list[LogRecord]:
    """A clean event log from the simulator, in event-time order."""
    config = SimConfig.from_dict({"seed": seed, "max_impressions": impressions, "duration_s": None})
    out: list[LogRecord] = []
    for topic, key, value in generate(config):
        if topic in KINDS:
            out.append((topic, str(key).encode(), orjson.dumps(value)))
    return out


def closing_impressions(partitions: int, ts: int) -> list[LogRecord]:
    """One impression per partition far in the future, so every earlier window closes."""
    out: list[LogRecord] = []
    for p in range(partitions):
        n = 0
        while partition_for(f"close-{p}-{n}".encode(), partitions) != p:
            n += 1
        imp_id = f"close-{p}-{n}"
        value: dict[str, object] = {"impression_id": imp_id, "request_id": "close"}
        value |= {"user_id": "u0", "item_id": "i0", "ts": ts, "position": 0}
        out.append((IMPRESSIONS, imp_id.encode(), orjson.dumps(value)))
    return out


def horizon(log: Iterable[LogRecord], config: JoinConfig) -> int:
    """An event time past every window of ``log`` (for closing impressions)."""
    last = 0
    for _, _, raw in log:
        try:
            ts = orjson.loads(raw)["ts"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            continue  # garbage mixed into the log
        if isinstance(ts, int):
            last = max(last, ts)
    return int(last + config.click_window_ms + config.follow_window_ms + 10 * 60_000)


def shuffle_within(log: list[LogRecord], lateness_ms: int, seed: int) -> list[LogRecord]:
    """Reorder records by a random delay below the allowed lateness (still joinable)."""
    rng = random.Random(seed)
    keyed = [
        (orjson.loads(rec[2])["ts"] + rng.randrange(max(1, lateness_ms // 2)), i, rec)
        for i, rec in enumerate(log)
    ]
    return [rec for _, _, rec in sorted(keyed)]


def produce(senv: StreamEnv, log: Iterable[LogRecord], *, key_override: bool = False) -> int:
    """Send records to their topics keyed by impression id (or by ``user_id`` to test
    repartitioning when ``key_override``); return how many were sent."""
    producer = KafkaProducer(bootstrap_servers=senv.bootstrap, linger_ms=10, acks="all")
    n = 0
    for kind, key, raw in log:
        producer.send(senv.topic(kind), key=b"misrouted-" + key if key_override else key, value=raw)
        n += 1
    producer.flush(timeout=60)
    producer.close()
    return n


def consume_all(
    bootstrap: str, topic: str, *, until: int, timeout_s: float = 120.0, idle_s: float = 5.0
) -> list[bytes]:
    """Read a topic from the start until ``until`` records or nothing new for ``idle_s``."""
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    values: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    last_new = time.monotonic()
    while time.monotonic() < deadline:
        batch = consumer.poll(timeout_ms=500)
        for records in batch.values():
            values.extend(r.value for r in records)
            last_new = time.monotonic()
        if len(values) >= until and time.monotonic() - last_new > idle_s:
            break
    consumer.close()
    return values


def uncommitted(senv: StreamEnv) -> dict[str, int]:
    """Records of each input topic past the worker group's committed offsets (0: all committed)."""
    admin = KafkaAdminClient(bootstrap_servers=senv.bootstrap)
    try:
        committed = admin.list_group_offsets(f"stream-{senv.tag}")[f"stream-{senv.tag}"]
    finally:
        admin.close()
    consumer = KafkaConsumer(bootstrap_servers=senv.bootstrap)
    try:
        tps = [TopicPartition(senv.topic(k), p) for k in KINDS for p in range(senv.partitions)]
        ends = consumer.end_offsets(tps)
    finally:
        consumer.close()
    out = dict.fromkeys(KINDS, 0)
    for kind, tp in zip([k for k in KINDS for _ in range(senv.partitions)], tps, strict=True):
        done = committed[tp].offset if tp in committed else 0
        out[kind] += ends[tp] - done
    return out


def samples_by_impression(raw: Iterable[bytes]) -> dict[str, list[Sample]]:
    """Group decoded samples by impression id (duplicates kept)."""
    out: dict[str, list[Sample]] = {}
    for value in raw:
        sample = decode_sample(value)
        out.setdefault(sample.impression_id, []).append(sample)
    return out


def as_log_pairs(log: Iterable[LogRecord]) -> list[tuple[str, bytes]]:
    """The (kind, raw) pairs the reference join reads."""
    return [(kind, raw) for kind, _, raw in log]


def garbage(n: int, seed: int) -> list[LogRecord]:
    """Malformed records for every input topic: bad JSON, missing fields, wrong types."""
    rng = random.Random(seed)
    bad: list[Any] = [b"{not json", b'{"impression_id": "x"}', b'{"impression_id": 5, "ts": 1}']
    bad += [b'"just a string"', b'{"impression_id": "y", "ts": "soon"}', b"\xff\xfe"]
    return [(rng.choice(KINDS), b"junk", rng.choice(bad)) for _ in range(n)]


def wait_group_split(senv: StreamEnv, members: int, timeout_s: float = 60.0) -> list[list[int]]:
    """Wait until the workers' group is stable with ``members`` members, each owning input
    partitions; return the impressions partitions of each."""
    group = f"stream-{senv.tag}"
    impressions = senv.topic(IMPRESSIONS)
    owned: list[list[int]] = []
    admin = KafkaAdminClient(bootstrap_servers=senv.bootstrap)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = admin.describe_groups([group])[group]
            owned = [_owned(m, impressions) for m in info["members"]]
            if info["group_state"] == "Stable" and len(owned) == members and all(owned):
                return owned
            time.sleep(0.5)
    finally:
        admin.close()
    raise AssertionError(f"group {group} not split over {members} members: {owned}")


def _owned(member: dict[str, Any], topic: str) -> list[int]:
    """The partitions of ``topic`` assigned to a member of a described group."""
    assignment = member.get("member_assignment")
    if not isinstance(assignment, dict):
        return []
    parts = assignment.get("assigned_partitions", [])
    return sorted(p for a in parts if a["topic"] == topic for p in a["partitions"])
