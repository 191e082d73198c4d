"""A faust worker counts into a Table; after a restart the table is rebuilt from its changelog."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer

from tests.conftest import TopicFactory

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


class Worker:
    """A faust worker subprocess with its log in a file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        self._fh = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.faust_counter_app", "worker", "-l", "info"],
            cwd=REPO,
            env=env,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, after: int, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.log.read_text(errors="replace").count("Worker ready") > after:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited: {self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"worker not ready in {timeout_s}s: {self.log.read_text()[-3000:]}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            self._fh.close()


def _read(consumer: KafkaConsumer, n: int, timeout_s: float = 60.0) -> list[tuple[str, int]]:
    got: list[tuple[str, int]] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            got.extend((r.key.decode(), int(r.value)) for r in records)
    return got


def test_table_recovered_from_changelog_after_restart(
    kafka_bootstrap: str, topic_factory: TopicFactory, tmp_path: Path
) -> None:
    source, sink = topic_factory("counter-in"), topic_factory("counter-out")
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "COUNTER_APP_ID": f"counter-{uuid.uuid4().hex[:8]}",
        "COUNTER_SOURCE": source,
        "COUNTER_SINK": sink,
        "COUNTER_DATA_DIR": str(tmp_path / "faust"),
    }
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    consumer = KafkaConsumer(sink, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest")
    log = tmp_path / "worker.log"

    worker = Worker(env, log)
    worker.wait_ready(after=0)
    for key in "aaaaabbb":
        producer.send(source, key=key.encode(), value=b"x")
    producer.flush()
    first = _read(consumer, 8)
    assert [c for k, c in first if k == "a"] == [1, 2, 3, 4, 5]
    assert [c for k, c in first if k == "b"] == [1, 2, 3]
    assert worker.stop() == 0

    # memory store: the new worker starts empty and must rebuild the counts from the changelog
    worker = Worker(env, log)
    worker.wait_ready(after=1)
    for key in "aab":
        producer.send(source, key=key.encode(), value=b"x")
    producer.flush()
    second = _read(consumer, 3)
    assert worker.stop() == 0
    producer.close()
    consumer.close()
    assert sorted(second) == [("a", 6), ("a", 7), ("b", 4)]
