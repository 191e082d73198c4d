"""The join worker against the real broker, with each engine: labels equal the reference join."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import redis

from stream.join import JoinConfig
from tests.conftest import free_port
from tests.integration.stream_harness import (
    LogRecord,
    StreamEnv,
    WorkerProc,
    as_log_pairs,
    closing_impressions,
    consume_all,
    garbage,
    horizon,
    produce,
    samples_by_impression,
    shuffle_within,
    simulated_log,
    uncommitted,
    wait_group_split,
)
from tests.reference_join import ReferenceResult, reference_join

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CONFIG = JoinConfig()  # the worker's defaults: 30 min windows, 60 s lateness, final mode

Spawn = Callable[..., WorkerProc]


@pytest.fixture(params=["faust", "direct"])
def spawn(request: pytest.FixtureRequest) -> Iterator[Spawn]:
    """Start stream workers of one engine (every test runs with each); killed after the test."""
    started: list[WorkerProc] = []

    def start(senv: StreamEnv, name: str = "worker") -> WorkerProc:
        senv.extra.setdefault("MTL_STREAM_ENGINE", request.param)
        proc = WorkerProc(senv, name)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.proc.poll() is None:
            proc.stop(signal.SIGKILL)


def _expected(log: list[LogRecord], config: JoinConfig = CONFIG) -> ReferenceResult:
    return reference_join(as_log_pairs(log), config, now_ms=2**62)


def _check_labels(got: dict[str, list[object]], want: ReferenceResult) -> None:
    missing = sorted(set(want.labels) - set(got))
    assert not missing, f"{len(missing)} impressions without a sample, e.g. {missing[:5]}"
    wrong = []
    for imp_id, labels in want.labels.items():
        for sample in got[imp_id]:
            if sample.labels != labels or sample.masks != want.masks[imp_id]:  # type: ignore[attr-defined]
                wrong.append((imp_id, sample.labels, labels))  # type: ignore[attr-defined]
    assert not wrong, f"{len(wrong)} samples disagree with the reference, e.g. {wrong[:3]}"


def _run_to_end(
    spawn: Spawn,
    senv: StreamEnv,
    log: list[LogRecord],
    n_impressions: int,
    *,
    before_start: bool = False,
) -> dict[str, list[object]]:
    closing = closing_impressions(senv.partitions, horizon(log, CONFIG))
    worker = None
    if not before_start:
        worker = spawn(senv)
        worker.wait_ready()
    produce(senv, log + closing)
    if worker is None:
        worker = spawn(senv)
        worker.wait_ready()
    raw = consume_all(senv.bootstrap, senv.topic("samples"), until=n_impressions)
    assert worker.stop() == 0, worker.text()[-3000:]
    return samples_by_impression(raw)  # type: ignore[return-value]


def test_shuffled_log_with_duplicates_and_garbage_matches_reference(
    spawn: Spawn, kafka_bootstrap: str, redis_url: str, tmp_path: Path
) -> None:
    senv = StreamEnv(kafka_bootstrap, redis_url, tmp_path)
    clean = simulated_log(2000, seed=11)
    dups = clean[::37]  # a duplicate of every 37th record, arriving later
    log = shuffle_within(clean + dups, CONFIG.allowed_lateness_ms, seed=3)
    bad = garbage(25, seed=5)
    log = log[:500] + bad + log[500:]
    want = _expected(log)
    got = _run_to_end(spawn, senv, log, len(want.labels))
    _check_labels(got, want)
    duplicates = {k: v for k, v in got.items() if len(v) > 1}
    assert not duplicates, f"one worker without crashes emitted duplicates: {list(duplicates)[:3]}"
    letters = [
        orjson.loads(v) for v in consume_all(kafka_bootstrap, senv.topic("dead_letters"), until=25)
    ]
    reasons = {d["reason"] for d in letters}
    assert len([d for d in letters if d["offset"] >= 0]) == 25, reasons
    assert "invalid_json" in reasons and len(reasons) >= 3, reasons
    assert all({"topic", "partition", "offset", "raw", "reason"} <= set(d) for d in letters)
    # live item counters reached Redis
    client = redis.Redis.from_url(redis_url)
    some_item = orjson.loads(clean[0][2])["item_id"]
    assert client.hget(f"{senv.namespace}feat:item:{some_item}", "item_imp_1h") is not None
    client.close()


def test_misrouted_keys_are_repartitioned(
    spawn: Spawn, kafka_bootstrap: str, redis_url: str, tmp_path: Path
) -> None:
    senv = StreamEnv(kafka_bootstrap, redis_url, tmp_path)
    log = simulated_log(400, seed=12)
    want = _expected(log)
    closing = closing_impressions(senv.partitions, horizon(log, CONFIG))
    worker = spawn(senv)
    worker.wait_ready()
    produce(senv, log, key_override=True)  # keyed by something else: forwarded, not rejected
    produce(senv, closing)
    raw = consume_all(kafka_bootstrap, senv.topic("samples"), until=len(want.labels))
    assert worker.stop() == 0
    _check_labels(samples_by_impression(raw), want)  # type: ignore[arg-type]
    assert "repartitioned=" in worker.text()


def test_backlog_replay_one_topic_read_far_ahead(
    spawn: Spawn, kafka_bootstrap: str, redis_url: str, tmp_path: Path
) -> None:
    # all impressions, then all clicks, then all follow-ons, and only then the worker starts:
    # the watermark is the minimum over the three topics, so nothing closes early.
    senv = StreamEnv(kafka_bootstrap, redis_url, tmp_path)
    log = simulated_log(1500, seed=13)
    order = {"impressions": 0, "clicks": 1, "follow_clicks": 2}
    backlog = sorted(log, key=lambda rec: order[rec[0]])
    want = _expected(log)
    got = _run_to_end(spawn, senv, backlog, len(want.labels), before_start=True)
    _check_labels(got, want)


def test_sigkill_mid_stream_loses_nothing(
    spawn: Spawn, kafka_bootstrap: str, redis_url: str, tmp_path: Path
) -> None:
    # short windows, so that samples close (and are emitted) while the stream runs
    short = JoinConfig(click_window_ms=30_000, follow_window_ms=30_000, allowed_lateness_ms=10_000)
    windows = {"MTL_CLICK_WINDOW_MS": "30000", "MTL_FOLLOW_WINDOW_MS": "30000"}
    windows["MTL_ALLOWED_LATENESS_MS"] = "10000"
    senv = StreamEnv(kafka_bootstrap, redis_url, tmp_path, extra=windows)
    log = simulated_log(4000, seed=14)
    want = _expected(log, short)
    closing = closing_impressions(senv.partitions, horizon(log, short))
    half = len(log) // 2
    first = spawn(senv, "first")
    first.wait_ready()
    produce(senv, log[:half])
    # kill it without warning as soon as it has emitted samples (mid-stream, not at the end)
    deadline = time.monotonic() + 60
    while _samples_emitted(first.text()) == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _samples_emitted(first.text()) > 0, "the first worker never emitted a sample"
    first.stop(signal.SIGKILL)
    produce(senv, log[half:] + closing)
    second = spawn(senv, "second")
    second.wait_ready()
    raw = consume_all(kafka_bootstrap, senv.topic("samples"), until=len(want.labels))
    got = samples_by_impression(raw)
    missing = len(want.labels) - len(got)
    if missing > 0:
        # the kill's duplicates count toward `until`, so the read may stop before the samples
        # that wait for an idle input (MTL_IDLE_TIMEOUT_MS): read again, for longer
        until = len(raw) + missing
        raw = consume_all(
            kafka_bootstrap, senv.topic("samples"), until=until, timeout_s=60, idle_s=15.0
        )
        got = samples_by_impression(raw)
    # the offsets move on while the worker runs: what faust skipped must not stall its commits
    deadline = time.monotonic() + 30
    while any(uncommitted(senv).values()) and time.monotonic() < deadline:
        time.sleep(1.0)
    assert uncommitted(senv) == dict.fromkeys(["impressions", "clicks", "follow_clicks"], 0)
    assert second.stop() == 0
    _check_labels(got, want)  # type: ignore[arg-type]
    for imp_id, copies in got.items():
        assert len({s.sample_id for s in copies}) == 1, imp_id
        assert len({s.labels for s in copies}) == 1, imp_id


def test_two_workers_split_partitions_and_emit_each_sample_once(
    spawn: Spawn, kafka_bootstrap: str, redis_url: str, tmp_path: Path
) -> None:
    senv = StreamEnv(kafka_bootstrap, redis_url, tmp_path)
    log = simulated_log(2000, seed=15)
    want = _expected(log)
    closing = closing_impressions(senv.partitions, horizon(log, CONFIG))
    a, b = spawn(senv, "a"), spawn(senv, "b")
    a.wait_ready()
    b.wait_ready()
    # let the group settle before traffic: a rebalance mid-stream may duplicate, and a worker
    # alone in the group for a while may read everything before the other one is given any
    owned = wait_group_split(senv, members=2)
    assert sorted(p for ps in owned for p in ps) == list(range(senv.partitions))
    produce(senv, log + closing)
    raw = consume_all(kafka_bootstrap, senv.topic("samples"), until=len(want.labels))
    assert a.stop() == 0 and b.stop() == 0
    got = samples_by_impression(raw)
    _check_labels(got, want)  # type: ignore[arg-type]
    assert sum(len(v) for v in got.values()) == len(got), "some sample was emitted twice"
    # both took part: each read some of the input
    assert _events_seen(a.text()) > 0 and _events_seen(b.text()) > 0


def test_a_new_owner_finishes_what_the_previous_one_read_to_the_end(
    spawn: Spawn, kafka_bootstrap: str, redis_url: str, tmp_path: Path
) -> None:
    # The first worker reads and commits every record but stops before its inputs go idle, so
    # the last windows are still open. The second has nothing left to read: only the event
    # times the first one saved can tell it that those windows are over.
    senv = StreamEnv(kafka_bootstrap, redis_url, tmp_path)
    senv.extra["MTL_IDLE_TIMEOUT_MS"] = "600000"
    log = simulated_log(600, seed=17)
    want = _expected(log)
    produce(senv, log + closing_impressions(senv.partitions, horizon(log, CONFIG)))
    first = spawn(senv, "first")
    first.wait_ready()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if _events_seen(first.text()) >= len(log) and not any(uncommitted(senv).values()):
            break
        time.sleep(0.5)
    assert first.stop() == 0
    assert _events_seen(first.text()) >= len(log) and not any(uncommitted(senv).values())
    assert _samples_emitted(first.text()) < len(want.labels), "nothing was left open"
    senv.extra["MTL_IDLE_TIMEOUT_MS"] = "1500"
    second = spawn(senv, "second")
    second.wait_ready()
    raw = consume_all(kafka_bootstrap, senv.topic("samples"), until=len(want.labels))
    assert second.stop() == 0
    assert _events_seen(second.text()) == 0  # everything was committed: it read nothing
    _check_labels(samples_by_impression(raw), want)  # type: ignore[arg-type]


def _check(senv: StreamEnv) -> subprocess.CompletedProcess[bytes]:
    """`mtlstream stream --check` with the test worker's environment."""
    cmd = [sys.executable, "-m", "mtlstream", "stream", "--check"]
    return subprocess.run(cmd, env=senv.env(), capture_output=True, timeout=60)


def _samples_emitted(log_text: str) -> int:
    """Samples a worker emitted, from its last status line."""
    lines = [line for line in log_text.splitlines() if "stream events=" in line]
    return int(lines[-1].split(" samples=")[1].split()[0]) if lines else 0


def _events_seen(log_text: str) -> int:
    """Events a worker read, from its last status line."""
    lines = [line for line in log_text.splitlines() if "stream events=" in line]
    return int(lines[-1].split("stream events=")[1].split()[0]) if lines else 0


def test_early_mode_emits_provisional_then_corrections(
    spawn: Spawn, kafka_bootstrap: str, redis_url: str, tmp_path: Path
) -> None:
    early = {
        "MTL_JOIN_MODE": "early",
        "MTL_EARLY_WAIT_MS": "5000",
        "MTL_ALLOWED_LATENESS_MS": "1000",
    }
    early["MTL_STREAM_METRICS_PORT"] = str(free_port())
    senv = StreamEnv(kafka_bootstrap, redis_url, tmp_path, extra=early)
    log = simulated_log(800, seed=16)
    want = _expected(log)
    closing = closing_impressions(senv.partitions, horizon(log, CONFIG))
    assert _check(senv).returncode == 1  # no worker yet: no health key
    worker = spawn(senv)
    worker.wait_ready()
    # as live traffic, in event-time order and in parts: read all at once, a batch engine would
    # see every click before any early deadline passed, and correct nothing
    parts = 8
    for k in range(parts):
        produce(senv, log[k * len(log) // parts : (k + 1) * len(log) // parts])
        time.sleep(0.5)
    produce(senv, closing)
    raw = consume_all(kafka_bootstrap, senv.topic("samples"), until=len(want.labels))
    metrics = httpx.get(f"http://127.0.0.1:{early['MTL_STREAM_METRICS_PORT']}/metrics").text
    check = _check(senv)
    assert check.returncode == 0, check.stderr  # the running worker refreshes its health key
    assert worker.stop() == 0
    got = samples_by_impression(raw)
    assert set(want.labels) <= set(got)
    corrected = 0
    for imp_id, labels in want.labels.items():
        revisions = sorted(got[imp_id], key=lambda s: s.revision)
        assert revisions[0].kind == "early" and revisions[0].sample_id == imp_id
        assert [s.revision for s in revisions] == list(range(len(revisions)))
        assert all(s.kind == "correction" for s in revisions[1:])
        assert len({s.sample_id for s in revisions}) == len(revisions)
        assert revisions[-1].labels == labels, imp_id  # the last revision carries the truth
        corrected += len(revisions) > 1
    assert corrected > 0, "no click arrived after the early wait: the test proves nothing"
    assert 'mtl_stream_samples_total{kind="correction"}' in metrics
    assert "mtl_stream_events_total" in metrics
