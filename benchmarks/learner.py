"""Learner throughput: samples/s from Kafka through training, and pure training compute.

Four measurements on the same samples (realistic ones from the simulator's world), each
result beside a same-run baseline:

- ``kafka -> train``: the daemon's real loop (:class:`learner.daemon.Learner`, default PLE),
  consumer and decoder on a background thread; baseline: one thread that polls, decodes each
  record with ``stream.events.decode_sample`` (:func:`learner.batching.decode_records_naive`)
  and trains, in turn.
- ``compute``: training steps (dedupe, forward, masked losses, backward, clip, step, metrics) on
  batches already decoded in memory; baseline: the same with dense embedding gradients and one
  Adam over every parameter, at torch's default thread count.

Rates are steady-state records/s: from the end of the first trained batch to the end of the
last, so imports, connections and the final checkpoint are left out.

Usage: ``.venv/bin/python benchmarks/learner.py [--samples 200000] [--bootstrap HOST:PORT
--redis-url URL] [--device cpu|cuda]``. Without ``--bootstrap`` it starts a private Kafka broker
and Redis (``mtlstream.services``, temporary directory, free ports) and stops them afterwards.
"""

# ruff: noqa: E402  # the sys.path fix below has to run before the project imports

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and this file, "learner.py",
# would shadow the `learner` package: drop that entry before importing the project.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse
import contextlib
import logging
import os
import socket
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import redis
import torch
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from learner.batching import decode_records, decode_records_naive
from learner.daemon import Learner
from learner.settings import LearnerSettings
from learner.source import RecordBatch, assign_partitions, open_consumer
from mtlstream import services
from stream.events import Labels, Masks, Sample, encode_sample
from stream.world import CLICK, FOLLOW_CLICK, IMPRESSION, World, WorldConfig

logger = logging.getLogger("benchmarks.learner")


def world_samples(n: int, seed: int = 0) -> list[bytes]:
    """`n` samples joined from the simulator's world (labels from its clicks and follow-ons)."""
    world = World(WorldConfig(seed=seed))
    out: list[bytes] = []
    t = world.now_ms
    while len(out) < n:
        request = world.sample_request(t)
        events = world.outcome(request, world.default_ranking(request))
        clicks: dict[str, int] = defaultdict(int)
        follows: dict[str, int] = defaultdict(int)
        for event in events:
            if event.kind == CLICK:
                clicks[event.value["impression_id"]] = 1
            elif event.kind == FOLLOW_CLICK:
                follows[event.value["impression_id"]] += 1
        for event in events:
            if event.kind == IMPRESSION and len(out) < n:
                out.append(encode_sample(_sample(event.value, clicks, follows)))
        t += 50
    return out


def _sample(imp: dict[str, Any], clicks: dict[str, int], follows: dict[str, int]) -> Sample:
    imp_id = imp["impression_id"]
    ysl = follows[imp_id]
    labels = Labels(click=clicks[imp_id], conversion=int(ysl > 0), ysl=ysl)
    return Sample(
        sample_id=imp_id,
        user_id=imp["user_id"],
        item_id=imp["item_id"],
        features=imp["features"],
        ts=imp["ts"],
        labels=labels,
        masks=Masks.for_labels(labels),
        kind="final",
        revision=0,
        elapsed_ms=1_800_000,
        emitted_at=imp["ts"] + 1_800_000,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def local_services(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """The given servers, or a private Kafka + Redis for the duration of the benchmark."""
    if args.bootstrap and args.redis_url:
        yield args.bootstrap, args.redis_url
        return
    with tempfile.TemporaryDirectory(prefix="mtl-bench-") as tmp:
        settings = services.ServicesSettings(
            data_dir=Path(tmp),
            kafka_port=_free_port(),
            kafka_controller_port=_free_port(),
            redis_port=_free_port(),
        )
        try:
            services.up(settings)
            yield settings.kafka_bootstrap, settings.redis_url
        finally:
            services.down(settings)


def produce_topic(bootstrap: str, values: list[bytes], partitions: int) -> tuple[str, float]:
    """Write the samples to a fresh topic; return its name and the produce rate."""
    topic = f"bench-samples-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, partitions, 1)])
    admin.close()
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=20, batch_size=1 << 20, max_request_size=8 << 20
    )
    start = time.perf_counter()
    for i, value in enumerate(values):
        producer.send(topic, key=str(i).encode(), value=value)
    producer.flush(timeout=120)
    producer.close()
    return topic, len(values) / (time.perf_counter() - start)


def _settings(args: argparse.Namespace, tmp: Path, **overrides: Any) -> LearnerSettings:
    values: dict[str, Any] = {
        "batch_size": args.batch_size,
        "device": args.device,
        "checkpoint_dir": tmp / f"ckpt-{uuid.uuid4().hex[:6]}",
        "metrics_file": str(tmp / "metrics.jsonl"),
        "log_every_s": 5.0,
        "group_id": f"bench-{uuid.uuid4().hex[:6]}",
        "namespace": f"bench{uuid.uuid4().hex[:6]}:",
    }
    values.update(overrides)
    return LearnerSettings(**values)


def bench_daemon(
    args: argparse.Namespace, tmp: Path, bootstrap: str, url: str, topic: str
) -> float:
    """The real daemon loop, burst mode over the whole topic; steady records/s."""
    settings = _settings(
        args,
        tmp,
        kafka_bootstrap=bootstrap,
        redis_url=url,
        samples_topic=topic,
        max_samples=args.samples,
    )
    client = redis.Redis.from_url(url)
    summary = Learner(settings, client).run()
    client.close()
    return float(summary["records_per_s"] or 0.0)


def bench_naive_consumer(
    args: argparse.Namespace, tmp: Path, bootstrap: str, url: str, topic: str
) -> float:
    """One thread: poll, decode each record into a `Sample`, train; steady records/s."""
    settings = _settings(args, tmp, kafka_bootstrap=bootstrap, redis_url=url, samples_topic=topic)
    learner = Learner(settings, redis.Redis.from_url(url))
    consumer = open_consumer(bootstrap, settings.group_id, settings.batch_size)
    assign_partitions(consumer, topic, (), {}, "earliest")
    spec = learner.model.args.features
    values: list[bytes | None] = []
    ends: dict[int, int] = {}
    done, first_at, first_done = 0, 0.0, 0
    while done < args.samples:
        for tp, records in consumer.poll(timeout_ms=200, max_records=args.batch_size).items():
            values.extend(r.value for r in records)
            ends[tp.partition] = records[-1].offset + 1
        if len(values) >= args.batch_size or done + len(values) >= args.samples:
            learner.train_on(RecordBatch(decode_records_naive(values, spec), len(values), ends))
            done += len(values)
            values, ends = [], {}
            if not first_at:
                first_at, first_done = time.perf_counter(), done
    consumer.close()
    return (done - first_done) / (time.perf_counter() - first_at)


def bench_compute(
    args: argparse.Namespace, tmp: Path, values: list[bytes], sparse: bool, threads: int
) -> float:
    """Training steps on batches decoded beforehand (on the device already); records/s."""
    settings = _settings(
        args, tmp, sparse_embeddings=sparse, torch_threads=threads, dedupe_horizon=0
    )
    learner = Learner(settings, redis.Redis(host="127.0.0.1", port=1))  # never connects
    spec = learner.model.args.features
    size = args.batch_size
    batches = [
        RecordBatch(decode_records(values[i : i + size], spec), size, {0: i + size})
        for i in range(0, min(len(values), size * args.compute_batches), size)
    ]
    learner.train_on(batches[0])  # warm-up: allocations, lazy init
    if learner.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches[1:]:
        learner.train_on(batch)
    if learner.device.type == "cuda":
        torch.cuda.synchronize()
    return float(size * (len(batches) - 1) / (time.perf_counter() - start))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200_000, help="samples through Kafka")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--compute-batches", type=int, default=25, help="batches timed in memory")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument(
        "--bootstrap", help="use this Kafka (with --redis-url) instead of a private one"
    )
    parser.add_argument("--redis-url")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)

    start = time.perf_counter()
    values = world_samples(max(args.samples, args.batch_size * args.compute_batches))
    mean_bytes = sum(len(v) for v in values) / len(values)
    made_in = time.perf_counter() - start
    print(f"samples={len(values)} mean_bytes={mean_bytes:.0f} made_in_s={made_in:.1f}")
    cores = os.cpu_count() or 1
    rows: list[tuple[str, float, str, float]] = []
    with tempfile.TemporaryDirectory(prefix="mtl-bench-learner-") as tmp_name:
        tmp = Path(tmp_name)
        compute = bench_compute(args, tmp, values, sparse=True, threads=0)
        dense = bench_compute(args, tmp, values, sparse=False, threads=cores)
        rows.append(("compute (in memory)", compute, f"dense Adam, {cores} threads", dense))
        with local_services(args) as (bootstrap, url):
            topic, produce_rate = produce_topic(bootstrap, values[: args.samples], args.partitions)
            print(f"topic={topic} partitions={args.partitions} produce_per_s={produce_rate:.0f}")
            daemon = bench_daemon(args, tmp, bootstrap, url, topic)
            naive = bench_naive_consumer(args, tmp, bootstrap, url, topic)
            rows.append(("kafka -> train (daemon)", daemon, "1 thread, decode_sample", naive))
    print(
        f"\nlearner throughput, default PLE, batch {args.batch_size}, device {args.device}, "
        f"{cores} cores, torch {torch.__version__}"
    )
    print(f"{'path':<26} {'samples/s':>11}   {'baseline':<26} {'samples/s':>11} {'x':>6}")
    for name, rate, base_name, base in rows:
        print(f"{name:<26} {rate:>11,.0f}   {base_name:<26} {base:>11,.0f} {rate / base:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
