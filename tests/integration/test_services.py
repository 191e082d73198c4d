"""The local launcher: up, status, down, up again, and a clear error for a port that is taken."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mtlstream import services
from mtlstream.errors import PortInUseError
from tests.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mtlstream", "services", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_up_status_down_up_again(tmp_path: Path) -> None:
    kafka, controller, redis_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "MTL_DATA_DIR": str(tmp_path / "svc"),
        "MTL_KAFKA_PORT": str(kafka),
        "MTL_KAFKA_CONTROLLER_PORT": str(controller),
        "MTL_REDIS_PORT": str(redis_port),
    }
    try:
        up = _cli("up", env=env)
        assert up.returncode == 0, up.stderr
        assert "kafka: running" in up.stdout and f"listen=127.0.0.1:{kafka}" in up.stdout
        assert f"listen=redis://127.0.0.1:{redis_port}/0" in up.stdout

        again = _cli("up", env=env)  # idempotent: reports the running services, starts nothing
        assert again.returncode == 0, again.stderr
        assert "already running" in again.stderr
        assert _pids(up.stdout) == _pids(again.stdout)

        status = _cli("status", env=env)
        assert status.returncode == 0 and status.stdout.count(": running") == 2

        smoke = _cli("smoke", env=env)
        assert smoke.returncode == 0 and "ok=True" in smoke.stdout, smoke.stdout + smoke.stderr

        down = _cli("down", env=env)
        assert down.returncode == 0 and "kafka" in down.stdout and "redis" in down.stdout
        stopped = _cli("status", env=env)
        assert stopped.returncode == 1 and stopped.stdout.count(": stopped") == 2
        for port in (kafka, redis_port):
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=2).close()

        # up again reuses the formatted Kafka storage and comes back healthy
        up2 = _cli("up", env=env)
        assert up2.returncode == 0, up2.stderr
        assert _cli("smoke", env=env).returncode == 0
    finally:
        _cli("down", env=env)


def test_port_taken_gives_error_naming_it(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        settings = services.ServicesSettings(data_dir=tmp_path, redis_port=port)
        with pytest.raises(PortInUseError, match=f"port {port}"):
            services.start_redis(settings)
        settings = services.ServicesSettings(
            data_dir=tmp_path, kafka_port=free_port(), kafka_controller_port=port
        )
        with pytest.raises(PortInUseError, match=f"port {port} \\(controller\\)"):
            services.start_kafka(settings)
        # the CLI turns it into a one-line error and exit code 2
        env = {**os.environ, "MTL_DATA_DIR": str(tmp_path), "MTL_REDIS_PORT": str(port)}
        done = _cli("up", env=env)
        assert done.returncode == 2
        assert f"port {port}" in done.stderr and "PortInUseError" in done.stderr


def _pids(stdout: str) -> list[str]:
    return [word for word in stdout.split() if word.startswith("pid=")]
