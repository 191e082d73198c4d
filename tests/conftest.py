"""Session fixtures for the real services: Kafka and Redis.

Order of preference, for each service: the server named by `KAFKA_BOOTSTRAP_SERVERS` /
`REDIS_URL`; else a testcontainers container where a Docker engine answers; else the project's own
launcher (a real KRaft broker and a real redis-server on free loopback ports, in a temporary data
directory). A service that cannot be had fails the run: nothing is skipped.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from mtlstream import services

TopicFactory = Callable[..., str]


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        done = subprocess.run(["docker", "info"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.fixture(scope="session")
def local_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.ServicesSettings]:
    """Settings of a launcher-managed Kafka + Redis pair for this test session (started lazily)."""
    settings = services.ServicesSettings(
        data_dir=tmp_path_factory.mktemp("services"),
        kafka_port=free_port(),
        kafka_controller_port=free_port(),
        redis_port=free_port(),
    )
    yield settings
    services.down(settings)


@pytest.fixture(scope="session")
def kafka_bootstrap(
    request: pytest.FixtureRequest, local_services: services.ServicesSettings
) -> Iterator[str]:
    """Bootstrap servers of a real Kafka broker."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    elif _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as container:
            yield container.get_bootstrap_server()
    else:
        yield services.start_kafka(local_services).address


@pytest.fixture(scope="session")
def redis_url(local_services: services.ServicesSettings) -> Iterator[str]:
    """URL of a real Redis server."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
    elif _docker_answers():
        from testcontainers.redis import RedisContainer

        with RedisContainer() as container:
            host = container.get_container_host_ip()
            yield f"redis://{host}:{container.get_exposed_port(6379)}/0"
    else:
        yield services.start_redis(local_services).address


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client of the session's Redis (bytes in, bytes out), closed after the test."""
    client = redis.Redis.from_url(redis_url)
    client.ping()
    yield client
    client.close()


@pytest.fixture
def counted(redis_url: str) -> Iterator[tuple[redis.Redis, list[object]]]:
    """A client that records every packed send, i.e. every round trip it makes."""
    sent: list[object] = []

    class CountingConnection(redis.Connection):
        def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            sent.append(command)
            # redis-py leaves the sync Connection.send_packed_command untyped
            send: Callable[[Any, bool], None] = super().send_packed_command
            send(command, check_health)

    pool = redis.ConnectionPool.from_url(redis_url, connection_class=CountingConnection)
    client = redis.Redis(connection_pool=pool)
    client.ping()  # connect (HELLO, SETINFO) before counting
    sent.clear()
    yield client, sent
    client.close()
    pool.disconnect()


@pytest.fixture
def namespace(redis_client: redis.Redis) -> Iterator[str]:
    """A Redis key prefix unique to this test; its keys are deleted afterwards."""
    prefix = f"t{uuid.uuid4().hex[:10]}:"
    yield prefix
    keys = list(redis_client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        redis_client.delete(*keys)


@pytest.fixture
def topic_factory(kafka_bootstrap: str) -> Iterator[TopicFactory]:
    """Create topics with names unique to this test: ``topic_factory("samples", partitions=4)``."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, client_id="tests")
    created: list[str] = []

    def make(name: str, partitions: int = 1) -> str:
        topic = f"{name}-{uuid.uuid4().hex[:8]}"
        admin.create_topics([NewTopic(topic, partitions, 1)])
        created.append(topic)
        return topic

    yield make
    if created:
        admin.delete_topics(created)
    admin.close()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A scratch directory for a test's checkpoints and outputs."""
    return tmp_path
