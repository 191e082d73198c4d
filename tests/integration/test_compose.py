"""docker/compose.yaml is valid and in step with the no-Docker path.

``docker compose config`` parses, merges and validates the file without a Docker engine (it needs
the client and its compose plugin only). The checks compare what it resolved with the code: the
settings dataclasses (same environment variables), the verbs' parsers (``--check``), the local
broker's properties (mtlstream/services.py) and pyproject's packages (what the image copies).
"""

from __future__ import annotations

import argparse
import ast
import base64
import dataclasses
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import pytest

from learner.settings import LearnerSettings
from mtlstream.cli import COMMANDS, VerbModule
from mtlstream.services import ServicesSettings, _kafka_properties
from mtlstream.settings import from_env
from serving.settings import ServingSettings
from stream.settings import StreamSettings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker" / "compose.yaml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
KAFKA_POM = REPO / "docker" / "local" / "kafka" / "pom.xml"

#: compose service -> the mtlstream verb it runs
VERBS = {"stream": "stream", "learner": "learn", "scorer": "serve", "simulator": "simulate"}
#: the services our processes connect to, by the variable that names them
CONNECTIONS = {"KAFKA_BOOTSTRAP_SERVERS": "kafka", "REDIS_URL": "redis"}
#: verb -> its settings dataclass (the simulator reads its few variables in its CLI module)
SETTINGS: dict[str, type[Any]] = {
    "stream": StreamSettings,
    "learn": LearnerSettings,
    "serve": ServingSettings,
}
#: broker properties that name hosts, ports or paths: compared by structure, not by value
LOCATION_KEYS = {"listeners", "advertised.listeners", "controller.quorum.voters", "log.dirs"}
#: variables of the Kafka image that are not broker properties
KAFKA_IMAGE_VARS = {"CLUSTER_ID", "KAFKA_HEAP_OPTS"}


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    """The services of docker/compose.yaml as `docker compose config` resolves them."""
    docker = shutil.which("docker")
    if docker is None:
        pytest.fail(
            "the `docker` client is not on PATH: this test needs it (and its compose plugin, no "
            "engine) to validate docker/compose.yaml; see docker/README.md",
            pytrace=False,
        )
    # the caller's COMPOSE_* variables (project name, profiles, extra files) change the result
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    cmd = [docker, "compose", "-f", str(COMPOSE), "config", "--format", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, check=False)
    if done.returncode != 0:
        pytest.fail(
            f"`docker {' '.join(cmd[1:])}` exited {done.returncode}:\n{done.stderr.strip()}\n"
            "(no engine is needed, but the Docker Compose v2 plugin is: see docker/README.md)",
            pytrace=False,
        )
    return cast(dict[str, dict[str, Any]], json.loads(done.stdout)["services"])


def _env(service: Mapping[str, Any]) -> dict[str, str]:
    return {k: "" if v is None else str(v) for k, v in (service.get("environment") or {}).items()}


def _is_os_environ(node: ast.expr) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "environ"
        and isinstance(node.value, ast.Name)
        and node.value.id == "os"
    )


def _environ_reads(module: str) -> set[str]:
    """Variables a module reads straight from the environment: os.environ[...] / .get / getenv."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise LookupError(f"module {module} not found")
    names: set[str] = set()
    for node in ast.walk(ast.parse(Path(spec.origin).read_text())):
        key: ast.expr | None = None
        if isinstance(node, ast.Subscript) and _is_os_environ(node.value):
            key = node.slice
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            func = node.func
            on_environ = func.attr == "get" and _is_os_environ(func.value)
            is_getenv = func.attr == "getenv" and isinstance(func.value, ast.Name)
            if on_environ or (is_getenv and cast(ast.Name, func.value).id == "os"):
                key = node.args[0]
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            names.add(key.value)
    return names


def _known_env(verb: str) -> set[str]:
    """Every variable `mtlstream <verb>` reads: its settings fields, its CLI, the dispatcher."""
    names = _environ_reads(COMMANDS[verb][0]) | _environ_reads("mtlstream.cli")
    if verb in SETTINGS:
        names |= {f.metadata["env"] for f in dataclasses.fields(SETTINGS[verb])}
    return names


def _kafka_env(key: str) -> str:
    """The apache/kafka image's variable for a broker property (`_` -> `__`, `-` -> `___`)."""
    return "KAFKA_" + key.replace("_", "__").replace("-", "___").replace(".", "_").upper()


def _listeners(value: str) -> dict[str, tuple[str, int]]:
    """``NAME://host:port,...`` -> {NAME: (host, port)}."""
    out = {}
    for part in value.split(","):
        name, _, address = part.partition("://")
        host, _, port = address.rpartition(":")
        out[name] = (host, int(port))
    return out


def test_the_six_services(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {*CONNECTIONS.values(), *VERBS}


def test_our_services_run_one_verb_of_one_image(services: dict[str, dict[str, Any]]) -> None:
    images = set()
    for name, verb in VERBS.items():
        service = services[name]
        assert verb in COMMANDS, f"{name}: `mtlstream {verb}` is no verb"
        assert service["command"][0] == verb, f"{name} runs {service['command']}"
        assert service.get("entrypoint") is None, f"{name}: the image's ENTRYPOINT is mtlstream"
        assert Path(service["build"]["context"]).resolve() == REPO
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
        images.add(service["image"])
    assert len(images) == 1, f"one image for all verbs, got {images}"


def test_environment_is_settings_of_the_verb(services: dict[str, dict[str, Any]]) -> None:
    for name, verb in VERBS.items():
        env = _env(services[name])
        unknown = set(env) - _known_env(verb)
        assert not unknown, f"{name}: {sorted(unknown)} are not read by `mtlstream {verb}`"
        if verb in SETTINGS:
            from_env(SETTINGS[verb], env)  # the values parse and pass validation


def test_shared_variables_agree(services: dict[str, dict[str, Any]]) -> None:
    values: dict[str, dict[str, str]] = {}
    for name in VERBS:
        for key, value in _env(services[name]).items():
            values.setdefault(key, {})[name] = value
    differing = {k: v for k, v in values.items() if len(set(v.values())) > 1}
    assert not differing, f"one variable, several values: {differing}"
    assert values["MTL_MODEL_NAME"].keys() >= {"learner", "scorer"}  # the scorer follows it


def test_connections_point_at_compose_services(services: dict[str, dict[str, Any]]) -> None:
    advertised = _listeners(_env(services["kafka"])["KAFKA_ADVERTISED_LISTENERS"])
    kafka_host, kafka_port = advertised["PLAINTEXT"]
    assert kafka_host == "kafka"
    for name, verb in VERBS.items():
        env, known = _env(services[name]), _known_env(verb)
        for var, target in CONNECTIONS.items():
            if var not in known:
                continue
            # unset, a process would use its default, 127.0.0.1: its own container
            assert var in env, f"{name} reads {var} but compose does not set it"
            if var == "KAFKA_BOOTSTRAP_SERVERS":
                assert env[var] == f"{kafka_host}:{kafka_port}", f"{name}: {var}={env[var]}"
            else:
                url = urlsplit(env[var])
                assert (url.scheme, url.hostname, url.port or 6379) == ("redis", target, 6379)
            condition = services[name].get("depends_on", {}).get(target, {}).get("condition")
            assert condition == "service_healthy", f"{name} must wait for a healthy {target}"


def test_healthchecks_call_check(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        assert not service.get("healthcheck", {}).get("disable"), f"{name}: no healthcheck"
        assert service["healthcheck"]["test"], f"{name}: no healthcheck"
    for name, verb in VERBS.items():
        test = services[name]["healthcheck"]["test"]
        assert test == ["CMD", "mtlstream", verb, "--check"], f"{name}: healthcheck {test}"


def test_check_flags_exist(services: dict[str, dict[str, Any]]) -> None:
    """Each healthcheck command parses with the verb's own arguments and sets ``check``."""
    missing = []
    for name, verb in VERBS.items():
        argv = services[name]["healthcheck"]["test"][3:]
        module = cast(VerbModule, importlib.import_module(COMMANDS[verb][0]))
        parser = argparse.ArgumentParser(prog=f"mtlstream {verb}")
        module.configure(parser)
        try:
            args = parser.parse_args(argv)
        except SystemExit:  # argparse's answer to an unknown flag
            missing.append(f"{name}: `mtlstream {verb} {' '.join(argv)}` is rejected")
            continue
        if getattr(args, "check", None) is not True:
            missing.append(f"{name}: `mtlstream {verb} --check` does not set args.check")
    assert not missing, "healthchecks the verbs cannot answer:\n" + "\n".join(missing)


def test_kafka_properties_mirror_local_broker(services: dict[str, dict[str, Any]]) -> None:
    local = ServicesSettings()
    text = _kafka_properties(local, Path("/unused"))
    props = dict(line.split("=", 1) for line in text.splitlines() if line)
    env = _env(services["kafka"])
    expected = {_kafka_env(k): v for k, v in props.items() if k not in LOCATION_KEYS}
    differ = {k: (env.get(k), v) for k, v in expected.items() if env.get(k) != v}
    assert not differ, f"compose vs local broker (variable: (compose, local)): {differ}"
    located = {_kafka_env(k) for k in LOCATION_KEYS}
    extra = {k for k in env if k.startswith("KAFKA_")} - KAFKA_IMAGE_VARS - set(expected)
    assert extra == located, f"broker settings the local broker lacks: {extra - located}"
    assert f"-Xmx{local.kafka_heap}" in env["KAFKA_HEAP_OPTS"].split()
    # auto-created topics get the stream worker's partition count
    stream_env = _env(services["stream"])
    partitions = stream_env.get("MTL_TOPIC_PARTITIONS", str(StreamSettings().partitions))
    assert env["KAFKA_NUM_PARTITIONS"] == partitions


def test_kafka_listeners_version_and_storage(services: dict[str, dict[str, Any]]) -> None:
    kafka = services["kafka"]
    env = _env(kafka)
    listeners = _listeners(env["KAFKA_LISTENERS"])
    advertised = _listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert set(listeners) == {env["KAFKA_INTER_BROKER_LISTENER_NAME"], controller}
    assert set(advertised) == {env["KAFKA_INTER_BROKER_LISTENER_NAME"]}
    for name, (_, port) in advertised.items():
        assert listeners[name][1] == port
    node = env["KAFKA_NODE_ID"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{node}@kafka:{listeners[controller][1]}"
    # a KRaft cluster id is a base64url UUID, as `services up` formats one
    assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16
    pom = re.search(r"<kafka.version>([^<]+)</kafka.version>", KAFKA_POM.read_text())
    assert pom is not None
    assert kafka["image"] == f"apache/kafka:{pom.group(1)}", "broker version differs from pom"
    mounts = {m["target"]: m for m in kafka["volumes"]}
    assert mounts[env["KAFKA_LOG_DIRS"]]["type"] == "volume"


def test_named_volumes_hold_state(services: dict[str, dict[str, Any]]) -> None:
    learner_dir = _env(services["learner"])["MTL_CHECKPOINT_DIR"]
    state = {"kafka": _env(services["kafka"])["KAFKA_LOG_DIRS"], "redis": "/data"}
    state["learner"] = learner_dir
    for name, target in state.items():
        mounts = {m["target"]: m for m in services[name].get("volumes", [])}
        assert target in mounts, f"{name}: no volume at {target}"
        assert mounts[target]["type"] == "volume", f"{name}: {target} is not a named volume"
    # made in the image, so that the volume starts out owned by the non-root user
    assert learner_dir in DOCKERFILE.read_text()


def test_scorer_port_is_published(services: dict[str, dict[str, Any]]) -> None:
    scorer = services["scorer"]
    env = _env(scorer)
    assert env["MTL_SERVE_HOST"] == "0.0.0.0"  # reachable from outside its container
    targets = {p["target"] for p in scorer["ports"] if p.get("published")}
    assert int(env.get("MTL_SERVE_PORT", ServingSettings().port)) in targets


def test_image_installs_every_package() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted(p.rstrip("*") for p in include)
    dockerfile = DOCKERFILE.read_text()
    ignore = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()}
    for package in packages:
        assert re.search(rf"^COPY {package}/ ", dockerfile, re.M), f"Dockerfile skips {package}"
        assert f"!{package}" in ignore, f".dockerignore leaves {package} out of the context"
    assert f'ENTRYPOINT ["{next(iter(pyproject["project"]["scripts"]))}"]' in dockerfile
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
