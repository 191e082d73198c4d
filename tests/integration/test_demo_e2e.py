"""`mtlstream demo` end to end: real Kafka and Redis, every process running, the loop closed.

- Under drift, after a fixed stretch of simulated time, the scorer served several versions; the
  served ranking beats a random ranking and the frozen first snapshot on ground truth (soft AUC
  of the served scores against the true click probability, on the same requests; the frozen
  snapshot is rebuilt from the registry and scores those requests' features from Redis); and
  freshness is measured and within the publish interval plus a small margin.
- A child that dies stops the demo with a non-zero exit, reporting it; nothing is left behind.
- SIGINT stops everything cleanly; nothing is left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import redis

from demo.metrics import grouped_soft_auc
from demo.monitor import JsonlTail
from demo.quality import frozen_model, model_served, rescore
from feature_store.registry import SnapshotRegistry
from feature_store.store import FeatureStore

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = {"ctr": 1.0, "cvr": 0.5, "ysl": 0.2}  # the scorer's default fusion
PUBLISH_EVERY_S = 4.0
FRESHNESS_MARGIN_S = 3.0  # consume + train + publish + swap, on a busy 2-core machine

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(420)]


def marked_processes(run_id: str) -> list[int]:
    """Processes whose environment carries the run's marker (every child of the demo)."""
    marker = f"MTL_DEMO_RUN_ID={run_id}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


class Demo:
    """`python -m demo` in a subprocess, against the session's Kafka and Redis."""

    def __init__(
        self,
        tmp_path: Path,
        kafka: str,
        redis_url: str,
        namespace: str,
        *flags: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.run_id = f"t{uuid.uuid4().hex[:8]}"
        self.out = tmp_path / "out"
        self.stderr_path = tmp_path / "demo.stderr"
        argv = [sys.executable, "-m", "demo", "--no-view", "--out", str(self.out)]
        argv += ["--run-id", self.run_id, "--namespace", namespace, "--stop-timeout", "8", *flags]
        environ = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": kafka,
            "REDIS_URL": redis_url,
            **(env or {}),
        }
        environ.pop("MTL_DEMO_RUN_ID", None)
        self._stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            argv, cwd=REPO, env=environ, stdout=subprocess.PIPE, stderr=self._stderr
        )

    def wait(self, timeout_s: float) -> tuple[int, str]:
        try:
            stdout, _ = self.proc.communicate(timeout=timeout_s)
        finally:
            if self.proc.poll() is None:  # the test failed: do not leave the demo running
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(60)
            self._stderr.close()
        return self.proc.returncode, stdout.decode()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def summary(self) -> dict[str, Any]:
        data: dict[str, Any] = orjson.loads((self.out / "summary.json").read_bytes())
        return data


@pytest.fixture
def demos() -> Iterator[list[Demo]]:
    started: list[Demo] = []
    yield started
    for demo in started:
        if demo.proc.poll() is None:
            demo.proc.kill()
            demo.proc.wait()
        for pid in marked_processes(demo.run_id):  # only if the demo failed its promise
            os.kill(pid, signal.SIGKILL)


def test_closed_loop_learns_beats_baselines_and_is_fresh(
    tmp_path: Path,
    kafka_bootstrap: str,
    redis_url: str,
    namespace: str,
    demos: list[Demo],
) -> None:
    demo = Demo(
        tmp_path,
        kafka_bootstrap,
        redis_url,
        namespace,
        *("--duration", "75", "--speedup", "60", "--rate", "300"),
        *("--publish-every", str(PUBLISH_EVERY_S), "--rotation", "30", "--pop-tau", "1"),
        env={"MTL_SNAPSHOTS_KEEP": "1000"},  # keep the first snapshot for the frozen baseline
    )
    demos.append(demo)
    code, stdout = demo.wait(360)
    assert code == 0, demo.stderr[-5000:]
    assert marked_processes(demo.run_id) == []
    summary = demo.summary()
    assert "mtlstream demo summary" in stdout and str(demo.out) in stdout

    # the scorer's model version advanced several times while it served
    versions = summary["scorer"]["versions"]
    assert len(versions) >= 5 and versions == sorted(versions), versions
    records = JsonlTail(demo.out / "served.jsonl").read()
    served_versions = {r["model_version"] for r in records if model_served(r)}
    assert len(served_versions) >= 5

    # ground truth, recomputed here: served vs random vs the frozen first snapshot
    client = redis.Redis.from_url(redis_url)
    try:
        registry = SnapshotRegistry(client, "ple", namespace)
        store = FeatureStore(client, namespace)
        first = frozen_model(registry.load(min(versions)), WEIGHTS)
        later = [r for r in records if model_served(r) and r["model_version"] > first.version]
        assert len(later) >= 300
        served = grouped_soft_auc((r["scores"], r["p_click"]) for r in later)
        rng = np.random.default_rng(0)
        random = grouped_soft_auc((rng.random(len(r["items"])), r["p_click"]) for r in later)
        frozen_scores = rescore(first, store, later, WEIGHTS)
        frozen = grouped_soft_auc(
            (scores, r["p_click"]) for (scores, _), r in zip(frozen_scores, later, strict=True)
        )
        assert served > random + 0.05, (served, random, frozen)
        assert served > frozen + 0.03, (served, random, frozen)
        # "the same requests": the newest snapshot rescored here reproduces what it served
        last = max(served_versions)
        own = [r for r in records if r["model_version"] == last][:50]
        again = rescore(frozen_model(registry.load(last), WEIGHTS), store, own, WEIGHTS)
        for (scores, _), record in zip(again, own, strict=True):
            assert scores == pytest.approx(record["scores"], rel=1e-4, abs=1e-7)
    finally:
        client.close()
    quality = summary["quality"]
    assert quality["served_auc"] == pytest.approx(served, abs=1e-9)
    assert quality["frozen_auc"] == pytest.approx(frozen, abs=1e-6)

    # freshness: measured over most samples, within the publish interval plus a small margin
    fresh = summary["freshness"]
    assert fresh["n"] >= 5000 and fresh["n"] > 5 * fresh["pending"]
    assert 0 < fresh["median_s"] <= PUBLISH_EVERY_S
    assert fresh["p95_s"] <= PUBLISH_EVERY_S + FRESHNESS_MARGIN_S, fresh
    # the max is one sample's tail on a shared 2-core machine (10.2 s seen once under a full
    # test run, with p95 6.4 s): bounded loosely, a stuck swap or learner still fails it
    assert fresh["max_s"] <= PUBLISH_EVERY_S + 3 * FRESHNESS_MARGIN_S, fresh
    # the learner's progressive metrics sit next to the oracle's on the same samples
    ctr_auc = next(m for m in summary["metrics"] if m["task"] == "ctr" and m["metric"] == "AUC")
    assert 0.5 < ctr_auc["model"] < ctr_auc["oracle"] <= 1.0
    plots = {Path(p).name for p in summary["plots"]}
    assert {"auc_vs_oracle.png", "freshness.png", "experts.png"} <= plots


def test_a_child_that_dies_stops_the_demo_with_an_error(
    tmp_path: Path,
    kafka_bootstrap: str,
    redis_url: str,
    namespace: str,
    demos: list[Demo],
) -> None:
    demo = Demo(
        tmp_path,
        kafka_bootstrap,
        redis_url,
        namespace,
        *("--duration", "300"),
        env={"MTL_LEARNER_ARCH": "no-such-arch"},  # the learner refuses to start
    )
    demos.append(demo)
    started = time.monotonic()
    code, stdout = demo.wait(180)
    assert code == 3, demo.stderr[-5000:]
    assert time.monotonic() - started < 150
    assert marked_processes(demo.run_id) == []
    assert "learn exited with code 2" in demo.stderr
    assert "no-such-arch" in demo.stderr  # the tail of its log is in the report
    summary = demo.summary()
    assert summary["stopped_by"] == "child learn (exit 2)" and summary["exit_code"] == 3
    assert summary["children"]["learn"] == 2
    assert "stopped by: child learn (exit 2)" in stdout


def test_sigint_stops_every_process_cleanly(
    tmp_path: Path,
    kafka_bootstrap: str,
    redis_url: str,
    namespace: str,
    demos: list[Demo],
) -> None:
    demo = Demo(tmp_path, kafka_bootstrap, redis_url, namespace, "--duration", "300")
    demos.append(demo)
    served = JsonlTail(demo.out / "served.jsonl")
    deadline = time.monotonic() + 150
    by_model = False  # wait for the whole loop: a request ranked by a published model
    while time.monotonic() < deadline and not by_model:
        assert demo.proc.poll() is None, demo.stderr[-5000:]
        by_model = any(model_served(r) for r in served.read())
        time.sleep(0.5)
    assert by_model, "no request was ever ranked by a model"
    children = marked_processes(demo.run_id)
    assert len(children) >= 4
    demo.proc.send_signal(signal.SIGINT)
    code, stdout = demo.wait(120)
    assert code == 130, demo.stderr[-5000:]
    assert marked_processes(demo.run_id) == []
    summary = demo.summary()
    assert summary["stopped_by"] == "SIGINT" and "stopped by: SIGINT" in stdout
    assert set(summary["children"]) == {"stream", "learn", "serve", "simulate"}
    learn_log = (demo.out / "logs" / "learn.log").read_text()
    assert "received SIGTERM" in learn_log  # children were asked, not only killed
