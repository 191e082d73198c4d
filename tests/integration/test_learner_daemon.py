"""The learner daemon against the real Kafka broker and Redis server.

- in process: consume, publish increasing versions, a reader rebuilds the model from the latest
  snapshot (no training code) and reproduces the learner's predictions exactly; report plots;
- as a subprocess: SIGKILL between checkpoints and restart: offsets and counts add up, every
  sample trained exactly once (the dedupe checksum proves it);
- as a subprocess: bad samples are counted by reason and skipped, `--check` follows the health
  key, SIGTERM exits 0 after a final checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import redis
import safetensors.torch
import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from feature_store.registry import SnapshotRegistry
from learner import report
from learner.batching import sample_hash
from learner.checkpoint import load_checkpoint
from learner.daemon import Learner, health_key
from learner.features import FeatureSpec, encode_rows
from learner.models import load_model
from learner.report import history_from_redis, read_history, write_report
from learner.settings import LearnerSettings
from stream.events import Labels, Masks, Sample
from tests.conftest import TopicFactory

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000_000
SMALL_MODEL = {
    "config": {"expert_hidden": [16]},
    "tower_hidden": [8],
    "features": {
        "categorical": [
            {"name": "user_id", "buckets": 512, "dim": 4},
            {"name": "item_id", "buckets": 256, "dim": 4},
            {"name": "user_segment", "buckets": 32, "dim": 4},
            {"name": "item_category", "buckets": 64, "dim": 4},
        ],
        "dense": ["user_activity", "item_price"],
    },
}


def make_sample(i: int, kind: str = "final") -> dict[str, Any]:
    """A sample whose click depends strongly on category and segment (learnable fast)."""
    rng = np.random.default_rng(i)
    user, item = int(rng.integers(300)), int(rng.integers(100))
    segment, category = user % 6, item % 10
    activity = round(float(rng.random() * 3), 3)
    logit = -2.5 + 3.0 * (category < 3) + 1.0 * (segment < 2) + 0.3 * activity
    click = int(rng.random() < 1 / (1 + np.exp(-logit)))
    conversion = click * int(rng.random() < (0.7 if category % 2 == 0 else 0.15))
    labels = Labels(click, conversion, conversion * (1 + int(rng.poisson(1.0))))
    sample = Sample(
        sample_id=f"imp-{i}",
        user_id=f"u{user}",
        item_id=f"i{item}",
        features={
            "user_id": f"u{user}",
            "item_id": f"i{item}",
            "user_segment": f"s{segment}",
            "item_category": f"c{category}",
            "user_activity": activity,
            "item_price": round(float(rng.lognormal(3, 0.5)), 2),
        },
        ts=T0 + i,
        labels=labels,
        masks=Masks.for_labels(labels),
        kind="final" if kind == "final" else "early",
        revision=0,
        elapsed_ms=1_800_000,
        emitted_at=T0 + 1_000 + i,
    )
    return sample.to_dict()


def produce(bootstrap: str, topic: str, values: list[bytes | None]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    for i, value in enumerate(values):
        producer.send(topic, key=f"k{i}".encode(), value=value)
    producer.flush(timeout=30)
    producer.close()


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        return {tp.partition: int(o) for tp, o in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def checksum(ids: set[str]) -> int:
    return sum(sample_hash(i) for i in ids) % 2**64


# --- in process ---------------------------------------------------------------------------------


def test_daemon_publishes_versions_a_reader_reproduces(
    kafka_bootstrap: str,
    redis_url: str,
    redis_client: redis.Redis,
    namespace: str,
    topic_factory: TopicFactory,
    data_dir: Path,
) -> None:
    topic = topic_factory("samples", partitions=2)
    samples = [make_sample(i) for i in range(6000)]
    produce(kafka_bootstrap, topic, [orjson.dumps(s) for s in samples])
    settings = LearnerSettings(
        kafka_bootstrap=kafka_bootstrap,
        redis_url=redis_url,
        namespace=namespace,
        samples_topic=topic,
        group_id=f"learner-{uuid.uuid4().hex[:6]}",
        model_args_json=json.dumps(SMALL_MODEL),
        batch_size=200,
        publish_every_s=0,
        publish_every_samples=2000,
        checkpoint_every_s=0,
        checkpoint_dir=data_dir / "ckpt",
        max_samples=len(samples),
        log_every_s=0.5,
        metrics_window=2000,
        lr=0.01,  # a short stream: learn fast enough for the metrics to show it
        embedding_lr=0.05,
        device="cpu",
    )
    pubsub = redis.client.PubSub(redis_client.connection_pool, ignore_subscribe_messages=True)
    pubsub.subscribe(f"{namespace}model:ple:updates")
    learner = Learner(settings, redis_client)
    summary = learner.run()

    assert summary["records"] == summary["samples"] == len(samples)
    assert summary["offsets"] == {str(p): o for p, o in end_offsets(kafka_bootstrap, topic).items()}
    announced = []
    deadline = time.monotonic() + 1.0  # None also stands for a skipped subscribe confirmation
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.1)
        if message is not None:
            announced.append(int(message["data"]))
    pubsub.close()
    assert len(announced) >= 3 and announced == sorted(announced)
    assert announced[-1] == learner.state.version

    # a reader with no training code: registry -> load_model -> predict
    snapshot = SnapshotRegistry(redis_client, "ple", namespace).load()
    assert snapshot.version == announced[-1]
    meta = snapshot.meta
    model = load_model(meta["model_args"], safetensors.torch.load(snapshot.weights))
    spec = FeatureSpec.from_dict(meta["feature_spec"])
    encoded = encode_rows(spec, [s["features"] for s in samples[:300]])
    cat, dense = encoded.to_tensors()
    theirs, ours = model.predict(cat, dense), learner.predict(cat, dense)
    for task in ("ctr", "cvr", "ctcvr", "ysl"):
        assert torch.equal(theirs[task], ours[task]), task
    assert meta["step"] == learner.state.step == len(samples) // 200
    assert meta["samples_seen"] == len(samples)
    assert meta["trained_through_ms"] == max(s["emitted_at"] for s in samples)
    assert sum(meta["offsets"][topic].values()) == len(samples)
    # progressive validation saw the signal (category and segment drive clicks)
    assert meta["metrics"]["ctr.auc_w"] > 0.7
    assert 0.5 < meta["metrics"]["ctr.calibration"] < 2.0

    history = read_history(settings.metrics_path)
    assert history and history[-1]["samples"] == len(samples)
    files = write_report(history, data_dir / "report")
    names = {f.name for f in files}
    assert {"metrics_auc.png", "metrics_logloss.png", "experts.png"} <= names
    assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files)
    from_redis = history_from_redis(SnapshotRegistry(redis_client, "ple", namespace))
    assert [r["version"] for r in from_redis] == SnapshotRegistry(
        redis_client, "ple", namespace
    ).versions()
    # the `mtlstream report` verb itself, from Redis
    parser = argparse.ArgumentParser()
    report.configure(parser)
    out = data_dir / "from-redis"
    flags = ["--from", "redis", "--redis-url", redis_url, "--namespace", namespace]
    assert report.main(parser.parse_args([*flags, "--out", str(out)])) == 0
    assert (out / "metrics_auc.png").is_file() and (out / "experts.png").is_file()


# --- as a subprocess ----------------------------------------------------------------------------


def learner_env(
    kafka_bootstrap: str, redis_url: str, namespace: str, topic: str, data_dir: Path, **extra: str
) -> dict[str, str]:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "REDIS_URL": redis_url,
        "MTL_NAMESPACE": namespace,
        "MTL_SAMPLES_TOPIC": topic,
        "MTL_LEARNER_GROUP": f"learner-{uuid.uuid4().hex[:6]}",
        "MTL_CHECKPOINT_DIR": str(data_dir / "ckpt"),
        "MTL_LEARNER_MODEL_ARGS": json.dumps(SMALL_MODEL),
        "MTL_LEARNER_BATCH_SIZE": "200",
        "MTL_LEARNER_MAX_BATCH_WAIT_S": "0.2",
        "MTL_LEARNER_LOG_EVERY_S": "0.2",
        "MTL_LEARNER_TORCH_THREADS": "1",
        "MTL_LEARNER_DEVICE": "cpu",
        "PYTHONPATH": str(REPO),
    }
    env.update(extra)
    return env


def start_learner(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "mtlstream", "learn", *args],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def health_fields(client: redis.Redis, key: str) -> dict[str, str]:
    raw = client.get(key)
    if raw is None:
        return {}
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return dict(part.split("=", 1) for part in text.split() if "=" in part)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_sigkill_between_checkpoints_then_restart_trains_every_sample_once(
    kafka_bootstrap: str,
    redis_url: str,
    redis_client: redis.Redis,
    namespace: str,
    topic_factory: TopicFactory,
    data_dir: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    topic = topic_factory("samples", partitions=2)
    n = 8000
    ids = [i for i in range(n)]
    # every 20th sample is sent twice, a few records are bad: all of it, paced, while it trains
    values: list[bytes | None] = []
    for i in ids:
        values.append(orjson.dumps(make_sample(i)))
        if i % 20 == 0:
            values.append(orjson.dumps(make_sample(i)))
        if i % 1000 == 7:
            values.append(b"{broken")
    env = learner_env(
        kafka_bootstrap,
        redis_url,
        namespace,
        topic,
        data_dir,
        MTL_CHECKPOINT_EVERY_SAMPLES="1500",
        MTL_CHECKPOINT_EVERY_S="0",
        MTL_PUBLISH_EVERY_S="0",
    )

    def paced() -> None:
        for start in range(0, len(values), 400):
            produce(kafka_bootstrap, topic, values[start : start + 400])
            time.sleep(0.15)

    producer = threading.Thread(target=paced)
    producer.start()
    log = data_dir / "learner.log"
    first = start_learner(env, log)
    processes.append(first)
    key = health_key(LearnerSettings(namespace=namespace))
    ckpt_dir = data_dir / "ckpt"

    def between_checkpoints() -> bool:
        ckpt = load_checkpoint(ckpt_dir)
        records = int(health_fields(redis_client, key).get("records", "0"))
        return ckpt is not None and records > ckpt.meta["records"] + 200

    wait_for("training past a checkpoint", between_checkpoints, timeout_s=60)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    killed_at = load_checkpoint(ckpt_dir)
    assert killed_at is not None and 0 < killed_at.meta["records"] < len(values)
    producer.join(timeout=60)

    second = start_learner(env, log, "--until-idle", "2")
    processes.append(second)
    assert second.wait(timeout=60) == 0, log.read_text()[-3000:]
    final = load_checkpoint(ckpt_dir)
    assert final is not None
    meta = final.meta
    ends = end_offsets(kafka_bootstrap, topic)
    assert sum(ends.values()) == len(values)
    assert meta["offsets"] == {str(p): o for p, o in ends.items()}
    assert meta["records"] == len(values)
    assert meta["samples"] == n
    assert meta["duplicates"] == n // 20
    assert meta["bad"] == {"invalid_json": n // 1000}
    assert meta["samples"] + meta["duplicates"] + meta["bad_total"] == meta["records"]
    # the multiset of trained ids is exactly the distinct ids: none lost, none trained twice
    assert meta["dedupe"]["checksum"] == checksum({f"imp-{i}" for i in ids})
    assert "resumed=True" in log.read_text()


def test_bad_samples_check_and_sigterm(
    kafka_bootstrap: str,
    redis_url: str,
    redis_client: redis.Redis,
    namespace: str,
    topic_factory: TopicFactory,
    data_dir: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    topic = topic_factory("samples", partitions=1)
    good = [orjson.dumps(make_sample(i)) for i in range(600)]
    with_unknown = orjson.dumps({**make_sample(600), "schema_hint": "v2"})  # tolerated
    bad: list[bytes | None] = [
        b"{not json",
        json.dumps({**make_sample(601), "features": {"item_price": float("nan")}}).encode(),
        orjson.dumps({k: v for k, v in make_sample(602).items() if k != "labels"}),
        orjson.dumps({**make_sample(603), "ts": "yesterday"}),
        orjson.dumps({**make_sample(604), "kind": "maybe"}),
        orjson.dumps({**make_sample(605), "labels": {"click": 1, "conversion": 0, "ysl": -3}}),
        None,  # a tombstone
    ]
    values = good[:300] + bad + [with_unknown] + good[300:]
    produce(kafka_bootstrap, topic, values)
    env = learner_env(kafka_bootstrap, redis_url, namespace, topic, data_dir)
    log = data_dir / "learner.log"
    check_cmd = [sys.executable, "-m", "mtlstream", "learn", "--check"]
    assert subprocess.run(check_cmd, env=env, cwd=REPO, capture_output=True).returncode == 1

    proc = start_learner(env, log)
    processes.append(proc)
    key = health_key(LearnerSettings(namespace=namespace))
    wait_for(
        "all records consumed",
        lambda: health_fields(redis_client, key).get("records") == str(len(values)),
        timeout_s=60,
    )
    assert subprocess.run(check_cmd, env=env, cwd=REPO, capture_output=True).returncode == 0
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    text = log.read_text()
    assert "received SIGTERM" in text
    summary = [line for line in text.splitlines() if "learner stopped" in line]
    assert len(summary) == 1 and f"bad={len(bad)}" in summary[0]
    assert "skipped bad samples" in text
    ckpt = load_checkpoint(data_dir / "ckpt")
    assert ckpt is not None
    assert ckpt.meta["samples"] == len(good) + 1
    assert ckpt.meta["records"] == len(values)
    assert ckpt.meta["bad"] == {
        "invalid_json": 2,
        "missing:labels": 1,
        "bad_type:ts": 1,
        "bad_value:kind": 1,
        "bad_value:labels.ysl": 1,
        "empty": 1,
    }
    # the group got the final offsets (for lag monitoring), though the checkpoint rules
    group = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=env["MTL_LEARNER_GROUP"])
    try:
        assert group.committed(TopicPartition(topic, 0)) == len(values)
    finally:
        group.close()
    # stopped: the health key is gone, so the check fails again
    assert redis_client.get(key) is None
    assert subprocess.run(check_cmd, env=env, cwd=REPO, capture_output=True).returncode == 1
