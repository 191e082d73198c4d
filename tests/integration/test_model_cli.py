"""`mtlstream model versions|show|rollback` against the real Redis."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import orjson
import pytest
import redis
import safetensors.numpy

from feature_store.registry import SnapshotRegistry

pytestmark = pytest.mark.integration


def _cli(*args: str, redis_url: str, namespace: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": redis_url, "MTL_NAMESPACE": namespace}
    return subprocess.run(
        [sys.executable, "-m", "mtlstream", "model", *args, "--model-name", "cli"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_versions_show_and_rollback(
    redis_client: redis.Redis, redis_url: str, namespace: str
) -> None:
    registry = SnapshotRegistry(redis_client, name="cli", namespace=namespace)
    for step in range(3):
        weights = safetensors.numpy.save({"w": np.full(4, step, dtype=np.float32)})
        registry.publish(weights, {"step": step})

    listed = _cli("versions", redis_url=redis_url, namespace=namespace)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split("\n")[:3] == ["1", "2", "3 latest"]

    shown = _cli("show", "2", redis_url=redis_url, namespace=namespace)
    assert shown.returncode == 0, shown.stderr
    meta = orjson.loads(shown.stdout)
    assert meta["version"] == 2 and meta["step"] == 1 and len(meta["sha256"]) == 64

    rolled = _cli("rollback", "1", redis_url=redis_url, namespace=namespace)
    assert rolled.returncode == 0, rolled.stderr
    assert rolled.stdout.strip() == "latest: 3 -> 1"
    assert registry.latest_version() == 1
    assert registry.load().meta["step"] == 0

    missing = _cli("rollback", "99", redis_url=redis_url, namespace=namespace)
    assert missing.returncode == 2 and registry.latest_version() == 1
    assert "SnapshotNotFoundError" in missing.stderr and "Traceback" not in missing.stderr
