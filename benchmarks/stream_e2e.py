"""Joined samples/s through the real broker for one stream worker, beside same-run baselines.

A backlog of simulated events (impressions, clicks, follow-on clicks, plus one closing
impression per partition) is produced first; then one `mtlstream stream` worker per engine
(``MTL_STREAM_ENGINE``: faust, then direct, each over its own copy of the backlog) is started
and timed from its start to the last sample. Two baselines run over the same backlog in the
same run: a kafka-python consume -> produce passthrough (one output record per input
impression, no join, no state: the broker round trip alone), and a faust app whose agent only
counts the events (``benchmarks/faust_null_app.py``: the ceiling of faust's consumer path).

Usage:  .venv/bin/python benchmarks/stream_e2e.py [--impressions 100000] [--engines faust,direct]
        [--bootstrap HOST:PORT --redis-url URL] [--no-counters]
Without --bootstrap (or KAFKA_BOOTSTRAP_SERVERS) it starts a private Kafka + Redis with the
project's launcher on free ports and stops them at the end.
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import orjson
from kafka import KafkaConsumer, KafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtlstream import services
from stream.join import JoinConfig
from tests.conftest import free_port
from tests.integration.stream_harness import (
    StreamEnv,
    WorkerProc,
    as_log_pairs,
    closing_impressions,
    consume_all,
    horizon,
    produce,
    samples_by_impression,
    simulated_log,
)
from tests.reference_join import ReferenceResult, reference_join

logger = logging.getLogger("bench.stream")


def passthrough(senv: StreamEnv, n_impressions: int) -> float:
    """Consume the three input topics and produce one record per impression; return seconds."""
    topics = [senv.topic(k) for k in ("impressions", "clicks", "follow_clicks")]
    consumer = KafkaConsumer(
        *topics,
        bootstrap_servers=senv.bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=f"baseline-{senv.tag}",
    )
    producer = KafkaProducer(bootstrap_servers=senv.bootstrap, linger_ms=5, batch_size=256 * 1024)
    out, start = 0, None
    while out < n_impressions:
        for tp, records in consumer.poll(timeout_ms=1000, max_records=5000).items():
            start = start or time.perf_counter()
            for r in records:
                if tp.topic == topics[0]:
                    producer.send(senv.topic("baseline"), key=r.key, value=r.value)
                    out += 1
    producer.flush()
    elapsed = time.perf_counter() - (start or time.perf_counter())
    consumer.close()
    producer.close()
    return elapsed


def faust_null(senv: StreamEnv, n_events: int) -> float:
    """Run the counting faust app over the input topics; return its events/s."""
    topics = [senv.topic(k) for k in ("impressions", "clicks", "follow_clicks")]
    env = {
        **senv.env(),
        "BENCH_TOPICS": ",".join(topics),
        "BENCH_EVENTS": str(n_events),
        "BENCH_APP_ID": f"null-{senv.tag}",
        "BENCH_DATA_DIR": str(senv.workdir / "faust-null"),
    }
    app = Path(__file__).with_name("faust_null_app.py")
    out = subprocess.run(
        [sys.executable, str(app), "worker", "-l", "warn"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    # faust's worker redirects stdout into its log (stderr), so look in both
    for line in (out.stdout + out.stderr).splitlines():
        if "RATE " in line:
            return float(line.split("RATE ")[1].split()[0])
    raise RuntimeError(f"faust null app gave no rate: {out.stderr[-500:]}")


def count_samples(senv: StreamEnv, want: int, timeout_s: float, start: float) -> tuple[int, float]:
    """Wait until ``want`` samples exist; return (count, seconds from ``start`` to the last)."""
    consumer = KafkaConsumer(
        senv.topic("samples"),
        bootstrap_servers=senv.bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    n, last = 0, start
    deadline = time.monotonic() + timeout_s
    while n < want and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500, max_records=10000).values():
            n += len(records)
            last = time.perf_counter()
    consumer.close()
    return n, last - start


def time_worker(senv: StreamEnv, impressions: int) -> tuple[int, float]:
    """Start one worker on a produced backlog; return (samples, seconds to the last one)."""
    worker = WorkerProc(senv)
    worker.wait_ready()  # timed from here: the whole backlog is still unread
    n, join_s = count_samples(senv, impressions, timeout_s=600, start=time.perf_counter())
    worker.stop()
    status = [line for line in worker.text().splitlines() if "stream events=" in line]
    if status:  # the totals at shutdown: orphans, dead letters, late events
        last = status[-1]
        logger.info("worker's last status: %s", last[last.index("events=") :])
    return n, join_s


def check_output(senv: StreamEnv, want: ReferenceResult) -> str:
    """Compare the samples with the reference join; explain each dead letter."""
    raw = consume_all(senv.bootstrap, senv.topic("samples"), until=len(want.labels))
    got = samples_by_impression(raw)
    wrong = [
        imp_id
        for imp_id, labels in want.labels.items()
        if imp_id not in got or any(s.labels != labels for s in got[imp_id])
    ]
    letters = [
        orjson.loads(v)
        for v in consume_all(senv.bootstrap, senv.topic("dead_letters"), until=0, idle_s=3.0)
    ]
    reasons = Counter(str(letter["reason"]) for letter in letters)
    # an orphan whose impression is in the log: an event read after its impression's state
    # expired; how far past the impression's window end it came (event time)
    past_end = []
    for letter in letters:
        event = orjson.loads(base64.b64decode(letter["raw"]))
        end = want.window_end.get(str(event.get("impression_id")))
        if letter["reason"] == "orphan" and end is not None:
            past_end.append(int(event["ts"]) - end)
    return (
        f"{len(want.labels) - len(wrong)}/{len(want.labels)} impressions with the reference "
        f"join's labels (wrong or missing e.g. {wrong[:3]}); dead letters {dict(reasons)}; "
        f"orphans of known impressions: {len(past_end)}, ms past their window end: "
        f"min {min(past_end, default=0)}, max {max(past_end, default=0)}"
    )


def run(
    bootstrap: str,
    redis_url: str,
    impressions: int,
    workdir: Path,
    counters: bool,
    engines: list[str],
) -> None:
    log = simulated_log(impressions, seed=1)
    closing = closing_impressions(StreamEnv.partitions, horizon(log, JoinConfig()))

    def backlog(engine: str) -> StreamEnv:
        extra = {"MTL_COUNTERS": str(counters).lower(), "MTL_STREAM_ENGINE": engine}
        senv = StreamEnv(bootstrap, redis_url, workdir / engine, extra=extra)
        senv.workdir.mkdir(parents=True, exist_ok=True)
        produce(senv, log + closing)
        return senv

    events = len(log) + len(closing)
    logger.info("backlog: %s events, %s impressions", events, impressions)
    senvs = {engine: backlog(engine) for engine in engines}
    first = next(iter(senvs.values()))
    base_s = passthrough(first, impressions)
    null_eps = faust_null(first, events)
    rows = [
        ("baseline passthrough (kafka-python)", impressions / base_s, base_s),
        ("baseline faust agent, count only (ev)", null_eps, events / null_eps),
    ]
    want = reference_join(as_log_pairs(log), JoinConfig(), now_ms=2**62)
    for engine, senv in senvs.items():
        n, join_s = time_worker(senv, impressions)
        if n < impressions:
            logger.warning("%s: only %s of %s samples within the timeout", engine, n, impressions)
        logger.info("worker (%s): %s", engine, check_output(senv, want))
        rate = n / join_s if join_s else 0.0
        rows.append((f"worker ({engine}), joined samples", rate, join_s))
        rows.append(
            (f"worker ({engine}), input events", events / join_s if join_s else 0.0, join_s)
        )
    print(f"\n{'path':<40} {'per s':>10} {'seconds':>9}")
    for name, rate, secs in rows:
        print(f"{name:<40} {rate:>10,.0f} {secs:>9.2f}")
    for name, rate, _ in rows[2::2]:
        ratios = f"{rate / rows[0][1]:.2f} x passthrough, {rate / null_eps:.2f} x faust count-only"
        print(f"{name}: {ratios}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--impressions", type=int, default=100_000)
    parser.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"))
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--no-counters", action="store_true", help="live item counters off")
    parser.add_argument("--engines", default="faust,direct", help="comma-separated, run in order")
    args = parser.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.bootstrap and args.redis_url:
            run(
                args.bootstrap,
                args.redis_url,
                args.impressions,
                workdir,
                not args.no_counters,
                engines,
            )
            return
        settings = services.ServicesSettings(
            data_dir=workdir / "services",
            kafka_port=free_port(),
            kafka_controller_port=free_port(),
            redis_port=free_port(),
        )
        try:
            services.up(settings)
            run(
                settings.kafka_bootstrap,
                settings.redis_url,
                args.impressions,
                workdir,
                not args.no_counters,
                engines,
            )
        finally:
            services.down(settings)


if __name__ == "__main__":
    main()
