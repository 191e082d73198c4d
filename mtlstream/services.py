"""Local Apache Kafka (KRaft, one combined broker+controller) and Redis on loopback, without Docker.

The Kafka jars come from Maven Central through ``docker/local/kafka/pom.xml`` and are cached per
pom content; ``redis-server`` is Debian's. Each service runs detached in its own session, with a
pid file and a log file in the data directory, so ``up`` / ``down`` / ``status`` work across
processes and ``up`` is idempotent.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mtlstream.errors import PortInUseError, ServiceError, ServiceStartError
from mtlstream.settings import env_field

__all__ = [
    "ServiceStatus",
    "ServicesSettings",
    "down",
    "ensure_kafka_jars",
    "start_kafka",
    "start_redis",
    "status",
    "up",
]

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ServicesSettings:
    """Where and how the local Kafka broker and Redis server run (`mtlstream services`)."""

    # all state (pid files, logs, Kafka log dirs, Redis dump) lives under this directory
    data_dir: Path = env_field(Path(".mtlstream/services"), "MTL_DATA_DIR", "services data dir")
    # Kafka jars are cached here, one folder per pom content hash
    cache_dir: Path = env_field(
        Path("~/.cache/mtlstream").expanduser(), "MTL_CACHE_DIR", "download cache (Kafka jars)"
    )
    # loopback address both services bind to
    host: str = env_field("127.0.0.1", "MTL_SERVICES_HOST", "address the services bind to")
    # client listener of the broker
    kafka_port: int = env_field(9092, "MTL_KAFKA_PORT", "Kafka client port")
    # KRaft controller listener
    kafka_controller_port: int = env_field(9093, "MTL_KAFKA_CONTROLLER_PORT", "KRaft port")
    # default partition count of auto-created topics
    kafka_partitions: int = env_field(4, "MTL_KAFKA_PARTITIONS", "default topic partitions")
    # JVM heap of the broker; small is fine for one node on loopback
    kafka_heap: str = env_field("768m", "MTL_KAFKA_HEAP", "broker JVM heap (-Xmx)")
    redis_port: int = env_field(6379, "MTL_REDIS_PORT", "Redis port")
    # the redis-server binary (Debian's package: apt-get install redis-server)
    redis_server: str = env_field("redis-server", "MTL_REDIS_SERVER", "redis-server binary")
    java: str = env_field("java", "MTL_JAVA", "java binary (17+)")
    mvn: str = env_field("mvn", "MTL_MVN", "Maven binary, used once to fetch the Kafka jars")
    # the Maven project that names the broker jars
    kafka_pom: Path = env_field(
        REPO_ROOT / "docker/local/kafka/pom.xml", "MTL_KAFKA_POM", "pom of the broker jars"
    )
    # seconds to wait for a service to answer after starting it
    start_timeout_s: float = env_field(60.0, "MTL_START_TIMEOUT_S", "start timeout (s)")

    @property
    def kafka_bootstrap(self) -> str:
        """Bootstrap servers of the local broker."""
        return f"{self.host}:{self.kafka_port}"

    @property
    def redis_url(self) -> str:
        """URL of the local Redis server."""
        return f"redis://{self.host}:{self.redis_port}/0"


@dataclass(frozen=True)
class ServiceStatus:
    """One line of ``services status``."""

    name: str
    running: bool
    pid: int | None
    address: str

    def line(self) -> str:
        """Format as one ``key=value`` status line."""
        state = "running" if self.running else "stopped"
        return f"{self.name}: {state} pid={self.pid or '-'} listen={self.address}"


# -- processes ---------------------------------------------------------------------------------


def _pid_file(settings: ServicesSettings, name: str) -> Path:
    return settings.data_dir / f"{name}.pid"


def _alive_pid(settings: ServicesSettings, name: str, marker: str) -> int | None:
    """The pid from the service's pid file if that process is alive and is really the service."""
    path = _pid_file(settings, name)
    try:
        pid = int(path.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    # a reused pid belongs to some other program: never signal it
    return pid if marker.encode() in cmdline else None


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _check_ports(name: str, host: str, ports: dict[str, int]) -> None:
    for what, port in ports.items():
        if not _port_free(host, port):
            raise PortInUseError(
                f"{name}: port {port} ({what}) on {host} is already in use by another process; "
                f"stop it or choose another port (see `mtlstream services up --help`)"
            )


def _spawn(args: list[str], log: Path, pid_file: Path) -> int:
    """Start ``args`` detached (own session, reparented to init) and record its pid."""
    log.parent.mkdir(parents=True, exist_ok=True)
    # A throwaway shell backgrounds the service and exits at once, so no Popen object outlives
    # this call and the service is not our child (it survives the CLI and is reaped by init).
    script = f"exec {shlex.join(args)} >>{shlex.quote(str(log))} 2>&1 </dev/null & echo $!"
    out = subprocess.run(
        ["/bin/sh", "-c", script],
        check=True,
        capture_output=True,
        text=True,
        start_new_session=True,
    )
    pid = int(out.stdout.strip())
    pid_file.write_text(f"{pid}\n")
    return pid


def _exited(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def _stop(settings: ServicesSettings, name: str, marker: str, timeout_s: float = 30.0) -> bool:
    """SIGTERM the service, SIGKILL it after ``timeout_s``; True if something was stopped."""
    pid = _alive_pid(settings, name, marker)
    _pid_file(settings, name).unlink(missing_ok=True)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while not _exited(pid):
        if time.monotonic() > deadline:
            logger.warning("%s pid=%s did not stop in %.0fs: killing it", name, pid, timeout_s)
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.1)
    return True


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_ready(
    name: str, pid: int, log: Path, timeout_s: float, probe: Callable[[], bool]
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if _exited(pid):
            raise ServiceStartError(f"{name} exited during start-up; last log lines:\n{_tail(log)}")
        if probe():
            return
        if time.monotonic() > deadline:
            raise ServiceStartError(
                f"{name} did not answer within {timeout_s:.0f}s; last log lines:\n{_tail(log)}"
            )
        time.sleep(0.2)


# -- Redis ----------------------------------------------------------------------------------------


def _redis_ready(settings: ServicesSettings) -> bool:
    import redis

    client = redis.Redis(host=settings.host, port=settings.redis_port, socket_timeout=1.0)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def start_redis(settings: ServicesSettings) -> ServiceStatus:
    """Start ``redis-server`` on loopback unless ours already runs."""
    address = settings.redis_url
    pid = _alive_pid(settings, "redis", "redis-server")
    if pid is not None:
        logger.info("redis already running pid=%s listen=%s", pid, address)
        return ServiceStatus("redis", True, pid, address)
    binary = shutil.which(settings.redis_server)
    if binary is None:
        raise ServiceError(
            f"{settings.redis_server!r} not found: install it (apt-get install -y redis-server) "
            "or run scripts/setup.sh"
        )
    _check_ports("redis", settings.host, {"client": settings.redis_port})
    workdir = (settings.data_dir / "redis").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    args = [binary, "--bind", settings.host, "--port", str(settings.redis_port)]
    args += ["--dir", str(workdir), "--daemonize", "no", "--appendonly", "no"]
    log = settings.data_dir / "redis.log"
    pid = _spawn(args, log, _pid_file(settings, "redis"))
    _wait_ready("redis", pid, log, settings.start_timeout_s, lambda: _redis_ready(settings))
    logger.info("redis started pid=%s listen=%s", pid, address)
    return ServiceStatus("redis", True, pid, address)


# -- Kafka ----------------------------------------------------------------------------------------


def ensure_kafka_jars(settings: ServicesSettings) -> Path:
    """Fetch the broker jars with Maven once per pom content; return the folder holding them."""
    pom = settings.kafka_pom
    if not pom.is_file():
        raise ServiceError(f"Kafka pom not found at {pom} (set MTL_KAFKA_POM)")
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()[:12]
    libs = settings.cache_dir / f"kafka-{digest}"
    if (libs / ".complete").is_file():
        return libs
    mvn = shutil.which(settings.mvn)
    if mvn is None:
        raise ServiceError(f"{settings.mvn!r} not found: Maven is needed once to fetch Kafka jars")
    logger.info("fetching Kafka jars with Maven into %s", libs)
    cmd = [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies"]
    cmd += [f"-DoutputDirectory={libs}", "-DincludeScope=runtime"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ServiceError(f"Maven could not fetch the Kafka jars:\n{done.stdout}\n{done.stderr}")
    (libs / ".complete").write_text(digest)
    return libs


def _kafka_properties(settings: ServicesSettings, log_dir: Path) -> str:
    host, port, cport = settings.host, settings.kafka_port, settings.kafka_controller_port
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{host}:{cport}",
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{cport}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(log_dir),
        "num.partitions": str(settings.kafka_partitions),
        "auto.create.topics.enable": "true",
        # one node: every internal topic has replication factor 1
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # fast start: few internal partitions, no initial rebalance delay
        "offsets.topic.num.partitions": "4",
        "transaction.state.log.num.partitions": "4",
        "group.initial.rebalance.delay.ms": "0",
        "log.retention.hours": "24",
    }
    return "".join(f"{k}={v}\n" for k, v in props.items())


def _kafka_ready(settings: ServicesSettings) -> bool:
    """True once a metadata request to the broker succeeds."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    if _port_free(settings.host, settings.kafka_port):
        return False
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=3000, client_id="probe"
        )
    except (KafkaError, OSError):
        return False
    try:
        admin.list_topics()
        return True
    except (KafkaError, OSError):
        return False
    finally:
        admin.close()


def start_kafka(settings: ServicesSettings) -> ServiceStatus:
    """Start a one-node KRaft Kafka broker on loopback unless ours already runs."""
    address = settings.kafka_bootstrap
    pid = _alive_pid(settings, "kafka", "kafka.Kafka")
    if pid is not None:
        logger.info("kafka already running pid=%s listen=%s", pid, address)
        return ServiceStatus("kafka", True, pid, address)
    ports = {"client": settings.kafka_port, "controller": settings.kafka_controller_port}
    _check_ports("kafka", settings.host, ports)
    libs = ensure_kafka_jars(settings)
    java = shutil.which(settings.java)
    if java is None:
        raise ServiceError(f"{settings.java!r} not found: Kafka needs Java 17 or newer")
    workdir = (settings.data_dir / "kafka").resolve()
    log_dir = workdir / "data"
    config = workdir / "server.properties"
    workdir.mkdir(parents=True, exist_ok=True)
    config.write_text(_kafka_properties(settings, log_dir))
    classpath = f"{libs.resolve()}/*"
    if not (log_dir / "meta.properties").is_file():
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        fmt = [java, "-cp", classpath, "kafka.tools.StorageTool", "format"]
        # `=` form: a base64 id may start with "-", which would read as an option
        fmt += [f"--cluster-id={cluster_id}", f"--config={config}"]
        done = subprocess.run(fmt, capture_output=True, text=True)
        if done.returncode != 0:
            raise ServiceStartError(f"kafka storage format failed:\n{done.stdout}{done.stderr}")
    log4j = REPO_ROOT / "docker/local/kafka/log4j2.yaml"
    args = [java, f"-Xmx{settings.kafka_heap}", "-Xms256m", "-XX:+UseParallelGC"]
    args += ["-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={log4j}"]
    args += ["-cp", classpath, "kafka.Kafka", str(config)]
    log = settings.data_dir / "kafka.log"
    pid = _spawn(args, log, _pid_file(settings, "kafka"))
    _wait_ready("kafka", pid, log, settings.start_timeout_s, lambda: _kafka_ready(settings))
    logger.info("kafka started pid=%s listen=%s", pid, address)
    return ServiceStatus("kafka", True, pid, address)


# -- the verbs ------------------------------------------------------------------------------------


def up(settings: ServicesSettings) -> list[ServiceStatus]:
    """Start Redis and Kafka (each only if ours is not already running)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return [start_redis(settings), start_kafka(settings)]


def down(settings: ServicesSettings) -> list[str]:
    """Stop both services; return the names of those that were running."""
    stopped = []
    for name, marker in (("kafka", "kafka.Kafka"), ("redis", "redis-server")):
        if _stop(settings, name, marker):
            stopped.append(name)
    return stopped


def status(settings: ServicesSettings) -> list[ServiceStatus]:
    """Report whether our Redis and Kafka run and where they listen."""
    redis_pid = _alive_pid(settings, "redis", "redis-server")
    kafka_pid = _alive_pid(settings, "kafka", "kafka.Kafka")
    return [
        ServiceStatus("redis", redis_pid is not None, redis_pid, settings.redis_url),
        ServiceStatus("kafka", kafka_pid is not None, kafka_pid, settings.kafka_bootstrap),
    ]
