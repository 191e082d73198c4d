"""The scorer app against a real Redis (ASGI transport), and `mtlstream serve` over loopback."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import redis

from feature_store.keys import KeySpace
from feature_store.registry import SnapshotRegistry, encode_meta
from feature_store.store import FeatureStore
from learner.features import encode_rows
from learner.models import RankingModel
from mtlstream import services
from serving.client import RankClient, RankError
from serving.routes import ServingState
from tests.conftest import free_port
from tests.serving_support import (
    TINY_ARGS,
    publish,
    running_app,
    serving_settings,
    tiny_model,
    wait_for_version,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ITEMS = {
    "i1": {"item_category": "c1", "item_price": 12.5, "item_age_h": 3, "item_ctr_1h": 0.08},
    "i2": {"item_category": "c2", "item_price": 99.0, "item_age_h": 40},
    "i3": {"item_category": "c1", "item_price": 1.0, "item_ctr_1h": 0.01},
}
USER = {"user_segment": "s3", "user_activity": 7.5}


@pytest.fixture
def registry(redis_client: redis.Redis, namespace: str) -> SnapshotRegistry:
    return SnapshotRegistry(redis_client, "ple", namespace)


@pytest.fixture
def model() -> RankingModel:
    return tiny_model(seed=1)


@pytest.fixture
def features(redis_client: redis.Redis, namespace: str) -> FeatureStore:
    store = FeatureStore(redis_client, namespace)
    store.write("user", [("u1", USER, 100)])
    store.write("item", [(k, v, 100) for k, v in ITEMS.items()])
    return store


def _metric(text: str, name: str) -> float:
    """The value of one sample line of a Prometheus exposition."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def _learner_predictions(model: RankingModel, rows: list[dict[str, Any]]) -> dict[str, Any]:
    cat, dense = encode_rows(model.args.features, rows).to_tensors()
    return {t: v.numpy() for t, v in model.predict(cat, dense).items()}


async def test_rank_scores_stored_features_exactly_as_the_learner_model(
    redis_url: str,
    namespace: str,
    registry: SnapshotRegistry,
    model: RankingModel,
    features: FeatureStore,
) -> None:
    version = publish(registry, model)
    candidates = ["i2", "unknown-item", "i1", "i3"]
    async with running_app(serving_settings(redis_url, namespace)) as (_, client):
        await wait_for_version(client, version)
        response = await client.post("/v1/rank", json={"user_id": "u1", "candidates": candidates})
    assert response.status_code == 200
    body = response.json()
    assert body["model_version"] == version
    assert response.headers["x-model-version"] == str(version)
    assert "x-degraded" not in response.headers
    rows = [
        {**USER, **ITEMS.get(i, {}), "user_id": "u1", "item_id": i}  # unknown item: defaults
        for i in candidates
    ]
    expected = _learner_predictions(model, rows)
    by_item = {item["item_id"]: item for item in body["items"]}
    assert sorted(by_item) == sorted(candidates)
    for k, item_id in enumerate(candidates):
        tasks = by_item[item_id]["tasks"]
        assert set(tasks) == {"ctr", "cvr", "ctcvr", "ysl"}
        for task, value in tasks.items():
            assert value == pytest.approx(float(expected[task][k]), rel=1e-6, abs=1e-7)
        fused = tasks["ctr"] * tasks["cvr"] ** 0.5 * (1 + tasks["ysl"]) ** 0.2
        assert by_item[item_id]["score"] == pytest.approx(fused, rel=1e-6)
    scores = [item["score"] for item in body["items"]]
    assert scores == sorted(scores, reverse=True)


async def test_same_request_same_response_top_k_and_boost(
    redis_url: str,
    namespace: str,
    registry: SnapshotRegistry,
    model: RankingModel,
    features: FeatureStore,
) -> None:
    version = publish(registry, model)
    request = {"user_id": "u1", "candidates": ["i1", "i2", "i3"]}
    async with running_app(serving_settings(redis_url, namespace)) as (_, client):
        await wait_for_version(client, version)
        first = await client.post("/v1/rank", json=request)
        second = await client.post("/v1/rank", json=request)
        top = await client.post("/v1/rank", json={**request, "top_k": 2})
        worst = first.json()["items"][-1]["item_id"]
        boosted = await client.post(
            "/v1/rank", json={**request, "context": {"boost": {worst: 1000.0}}}
        )
    assert first.content == second.content
    assert top.json()["items"] == first.json()["items"][:2]
    assert boosted.json()["items"][0]["item_id"] == worst
    before = {i["item_id"]: i["score"] for i in first.json()["items"]}
    assert boosted.json()["items"][0]["score"] == pytest.approx(before[worst] * 1000.0)


async def test_unknown_user_scores_with_defaults_and_extra_fields_are_listed(
    redis_url: str, namespace: str, registry: SnapshotRegistry, model: RankingModel
) -> None:
    version = publish(registry, model)
    async with running_app(serving_settings(redis_url, namespace)) as (_, client):
        await wait_for_version(client, version)
        response = await client.post(
            "/v1/rank", json={"user_id": "ghost", "candidates": ["x1"], "debug": 1, "a": 2}
        )
        metrics = (await client.get("/metrics")).text
    assert response.status_code == 200
    assert response.headers["x-ignored-fields"] == "a,debug"
    expected = _learner_predictions(model, [{"user_id": "ghost", "item_id": "x1"}])
    assert response.json()["items"][0]["tasks"]["ctr"] == pytest.approx(float(expected["ctr"][0]))
    assert 'mtl_serve_unknown_entities_total{entity="user"} 1.0' in metrics
    assert 'mtl_serve_unknown_entities_total{entity="item"} 1.0' in metrics


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [
        (b"{not json", 400, "malformed_json"),
        (b'{"user_id": "u1", "candidates": []}', 422, "empty_candidates"),
        (orjson.dumps({"user_id": "u1", "candidates": [f"i{k}" for k in range(51)]}), 422,
         "too_many_candidates"),
        (orjson.dumps({"user_id": "u1", "candidates": ["i" * 300]}), 422, "invalid_id"),
        (b'{"user_id": ["u1"], "candidates": ["i1"]}', 422, "wrong_type"),
        (b'{"user_id": "u1", "candidates": ["i1"], "context": {"boost": -1}}', 422,
         "invalid_boost"),
        (b'{"user_id": "u1", "candidates": ["i1"]}' + b" " * 5000, 413, "body_too_large"),
    ],
)  # fmt: skip
async def test_bad_requests_get_json_4xx_and_are_counted(
    redis_url: str,
    namespace: str,
    registry: SnapshotRegistry,
    model: RankingModel,
    content: bytes,
    status: int,
    code: str,
) -> None:
    version = publish(registry, model)
    settings = serving_settings(redis_url, namespace, max_body_bytes=4096)
    async with running_app(settings) as (_, client):
        await wait_for_version(client, version)
        response = await client.post(
            "/v1/rank", content=content, headers={"content-type": "application/json"}
        )
        metrics = (await client.get("/metrics")).text
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == code
    assert f'mtl_serve_errors_total{{code="{code}"}} 1.0' in metrics
    assert f'mtl_serve_requests_total{{status="{status}"}} 1.0' in metrics


async def test_health_model_and_metrics_before_and_after_the_first_snapshot(
    redis_url: str, namespace: str, registry: SnapshotRegistry, model: RankingModel
) -> None:
    async with running_app(serving_settings(redis_url, namespace)) as (_, client):
        health = await client.get("/health")
        assert health.status_code == 503
        assert health.json() == {
            "status": "unhealthy",
            "model_version": None,
            "runtime": None,
            "redis": "up",
        }
        assert (await client.get("/v1/model")).status_code == 503
        early = await client.post("/v1/rank", json={"user_id": "u1", "candidates": ["i1"]})
        assert (early.status_code, early.json()["error"]["code"]) == (503, "no_model")
        version = publish(registry, model, step=42)
        await wait_for_version(client, version)
        health = await client.get("/health")
        info = (await client.get("/v1/model")).json()
        await client.post("/v1/rank", json={"user_id": "u1", "candidates": ["i1", "i2"]})
        metrics = (await client.get("/metrics")).text
    assert health.status_code == 200 and health.json()["model_version"] == version
    assert info["model_version"] == version and info["step"] == 42
    assert info["runtime"] == "torch" and info["tasks"]["ysl"] == "count"
    assert info["fusion_weights"] == {"ctr": 1.0, "cvr": 0.5, "ysl": 0.2}
    assert 0 <= info["age_s"] < 60
    assert "item_price" in info["fields"] and "item_id" not in info["fields"]
    assert f"mtl_serve_model_version {float(version)}" in metrics
    assert "mtl_serve_request_seconds_count 2.0" in metrics  # the 503 and the 200
    assert 'mtl_serve_requests_total{status="200"} 1.0' in metrics
    assert "mtl_serve_model_age_seconds" in metrics and "mtl_serve_model_swaps_total 1.0" in metrics
    age = _metric(metrics, "mtl_serve_model_age_seconds")
    assert 0 <= age < 60


def _publish_corrupt(client: redis.Redis, namespace: str, model: RankingModel) -> int:
    """Write a snapshot whose blob fails its sha256 (a flipped byte), flip latest, announce."""
    import safetensors.torch

    keys = KeySpace(namespace)
    blob = safetensors.torch.save(model.state_dict())
    version = int(client.incr(keys.model_seq("ple")))
    meta = encode_meta({"model_args": model.model_args}, blob, version, int(time.time() * 1000))
    flipped = blob[:-1] + bytes([blob[-1] ^ 0xFF])
    pipe = client.pipeline(transaction=True)
    pipe.set(keys.model_blob("ple", version), flipped)
    fields: dict[Any, Any] = dict(meta)
    pipe.hset(keys.model_meta("ple", version), mapping=fields)
    pipe.zadd(keys.model_versions("ple"), {str(version): version})
    pipe.set(keys.model_latest("ple"), version)
    pipe.publish(keys.model_updates("ple"), version)
    pipe.execute()
    return version


async def _wait_metric(client: httpx.AsyncClient, needle: str, timeout_s: float = 10) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = (await client.get("/metrics")).text
        if needle in text:
            return text
        await asyncio.sleep(0.05)
    raise AssertionError(f"{needle!r} not in /metrics after {timeout_s}s")


async def test_corrupt_incompatible_and_unloadable_snapshots_are_refused(
    redis_url: str,
    namespace: str,
    redis_client: redis.Redis,
    registry: SnapshotRegistry,
    model: RankingModel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = publish(registry, model)
    request = {"user_id": "u1", "candidates": ["i1", "i2"]}
    async with running_app(serving_settings(redis_url, namespace)) as (_, client):
        await wait_for_version(client, good)
        before = (await client.post("/v1/rank", json=request)).content
        corrupt = _publish_corrupt(redis_client, namespace, tiny_model(seed=5))
        await _wait_metric(client, 'mtl_serve_snapshots_rejected_total{reason="corrupt"} 1.0')
        # weights of another architecture under these model_args: load_state_dict fails
        other = tiny_model(seed=6, args={**TINY_ARGS, "arch": "mmoe", "config": {}})
        meta = {"model_args": model.model_args}
        import safetensors.torch

        registry.publish(safetensors.torch.save(other.state_dict()), meta)
        await _wait_metric(client, 'mtl_serve_snapshots_rejected_total{reason="unloadable"} 1.0')
        # a model without the "ysl" task the fusion weights need
        three_tasks = {"ctr": "binary", "cvr": "binary", "ctcvr": "binary"}
        no_ysl = tiny_model(seed=7, args={**TINY_ARGS, "tasks": three_tasks})
        publish(registry, no_ysl)
        await _wait_metric(client, 'mtl_serve_snapshots_rejected_total{reason="incompatible"} 1.0')
        after = await client.post("/v1/rank", json=request)
        health = await client.get("/health")
    assert after.content == before and after.json()["model_version"] == good
    assert health.status_code == 200
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert any(f"version={corrupt} reason=corrupt serving={good}" in m for m in refused)
    assert any("['ysl']" in m for m in refused)


async def test_offloaded_inference_gives_the_same_answer(
    redis_url: str,
    namespace: str,
    registry: SnapshotRegistry,
    model: RankingModel,
    features: FeatureStore,
) -> None:
    version = publish(registry, model)
    request = {"user_id": "u1", "candidates": ["i3", "i1", "i2", "zz"]}
    answers = []
    for offload in (False, True):
        settings = serving_settings(redis_url, namespace, offload=offload)
        async with running_app(settings) as (_, client):
            await wait_for_version(client, version)
            answers.append((await client.post("/v1/rank", json=request)).json())
    assert answers[0] == answers[1]


class SlowSink:
    """An impression sink as slow as a struggling Kafka: each record takes a while."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.records: list[tuple[bytes, bytes]] = []

    async def start(self) -> None:
        return None

    async def send(self, key: bytes, value: bytes) -> None:
        await asyncio.sleep(self.delay_s)
        self.records.append((key, value))

    async def stop(self) -> None:
        return None


async def test_slow_impression_sink_never_slows_requests_and_drops_are_counted(
    redis_url: str,
    namespace: str,
    registry: SnapshotRegistry,
    model: RankingModel,
    features: FeatureStore,
) -> None:
    version = publish(registry, model)
    sink = SlowSink(delay_s=0.05)
    settings = serving_settings(redis_url, namespace, impressions_queue=6)
    request = {"user_id": "u1", "candidates": ["i1", "i2", "i3"], "context": {"page": 2}}
    async with running_app(settings, impression_sink=sink) as (app, client):
        await wait_for_version(client, version)
        started = time.perf_counter()
        for _ in range(10):
            assert (await client.post("/v1/rank", json=request)).status_code == 200
        elapsed = time.perf_counter() - started
        metrics = (await client.get("/metrics")).text
        state: ServingState = app.state.serving
        assert state.impressions is not None
        while state.impressions.queued:
            await asyncio.sleep(0.02)
    # 10 requests x 3 impressions; the queue holds 6: most requests were dropped, none waited
    assert elapsed < 10 * 3 * 0.05
    dropped = _metric(metrics, "mtl_serve_impressions_dropped_total")
    assert dropped >= 12 and dropped % 3 == 0
    assert len(sink.records) + dropped == 30
    first = orjson.loads(sink.records[0][1])
    assert first["position"] == 0 and first["user_id"] == "u1" and first["context"] == {"page": 2}
    assert first["features"]["item_price"] == ITEMS[first["item_id"]]["item_price"]
    assert first["features"]["user_segment"] == "s3"
    assert sink.records[0][0] == first["impression_id"].encode()


async def test_impressions_reach_kafka_with_the_features_used(
    redis_url: str,
    namespace: str,
    registry: SnapshotRegistry,
    model: RankingModel,
    features: FeatureStore,
    kafka_bootstrap: str,
    topic_factory: Any,
) -> None:
    from kafka import KafkaConsumer

    topic = topic_factory("impressions")
    version = publish(registry, model)
    settings = serving_settings(
        redis_url,
        namespace,
        impressions=True,
        kafka_bootstrap=kafka_bootstrap,
        impressions_topic=topic,
    )
    async with running_app(settings) as (_, client):
        await wait_for_version(client, version)
        response = await client.post(
            "/v1/rank",
            json={"user_id": "u1", "candidates": ["i1", "i2", "i3"], "top_k": 2},
            headers={"x-request-id": "req-42"},
        )
        await _wait_metric(client, "mtl_serve_impressions_sent_total 2.0", timeout_s=30)
    assert response.headers["x-request-id"] == "req-42"
    consumer = KafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest")
    records: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while len(records) < 2 and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            records += [orjson.loads(m.value) for m in batch]
    consumer.close()
    served = [item["item_id"] for item in response.json()["items"]]
    assert [r["item_id"] for r in sorted(records, key=lambda r: r["position"])] == served
    for record in records:
        assert record["request_id"] == "req-42" and record["user_id"] == "u1"
        assert record["features"]["item_category"] == ITEMS[record["item_id"]]["item_category"]
        assert record["features"]["user_activity"] == USER["user_activity"]
    from serving.impressions import impression_id

    assert {r["impression_id"] for r in records} == {
        impression_id("req-42", r["item_id"], r["position"]) for r in records
    }


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[services.ServicesSettings]:
    """A redis-server of this test's own, to stop and restart."""
    settings = services.ServicesSettings(data_dir=tmp_path / "redis", redis_port=free_port())
    services.start_redis(settings)
    yield settings
    services.down(settings)


async def _wait_health(client: httpx.AsyncClient, status: int, timeout_s: float = 15) -> None:
    async with asyncio.timeout(timeout_s):  # a hung probe fails here, with its stack
        while (await client.get("/health")).status_code != status:
            await asyncio.sleep(0.05)


async def test_redis_restart_keeps_serving_with_defaults_then_recovers(
    private_redis: services.ServicesSettings, model: RankingModel
) -> None:
    url = private_redis.redis_url
    sync = redis.Redis.from_url(url)
    version = publish(SnapshotRegistry(sync, "ple", "mtl:"), model)
    FeatureStore(sync, "mtl:").write("item", [("i1", ITEMS["i1"], 100)])
    request = {"user_id": "u1", "candidates": ["i1", "i2"]}
    async with running_app(serving_settings(url, "mtl:")) as (_, client):
        await wait_for_version(client, version)
        normal = await client.post("/v1/rank", json=request)
        services.down(private_redis)
        async with asyncio.timeout(10):
            during = [await client.post("/v1/rank", json=request) for _ in range(5)]
        await _wait_health(client, 503)
        services.start_redis(private_redis)
        await _wait_health(client, 200)
        FeatureStore(sync, "mtl:").write("item", [("i1", ITEMS["i1"], 100)])  # if not persisted
        after = await client.post("/v1/rank", json=request)
        metrics = (await client.get("/metrics")).text
        # snapshots are followed again too
        newer = publish(SnapshotRegistry(sync, "ple", "mtl:"), tiny_model(seed=2))
        await wait_for_version(client, newer, timeout_s=10)
    sync.close()
    assert normal.status_code == 200 and "x-degraded" not in normal.headers
    for response in during:
        assert response.status_code == 200
        assert response.headers["x-degraded"] == "default-features"
        assert response.json()["model_version"] == version
    defaults = _learner_predictions(
        model, [{"user_id": "u1", "item_id": "i1"}, {"user_id": "u1", "item_id": "i2"}]
    )
    by_item = {i["item_id"]: i["tasks"]["ctr"] for i in during[0].json()["items"]}
    assert by_item["i1"] == pytest.approx(float(defaults["ctr"][0]), rel=1e-6)
    assert after.status_code == 200 and "x-degraded" not in after.headers
    assert after.json() == normal.json()
    assert "mtl_serve_redis_up 1.0" in metrics
    assert _metric(metrics, "mtl_serve_default_feature_requests_total") >= 5


# --- the real process over loopback HTTP --------------------------------------------------------


@pytest.fixture
def scorer_process(
    redis_url: str,
    namespace: str,
    registry: SnapshotRegistry,
    model: RankingModel,
    tmp_path: Path,
) -> Iterator[tuple[int, int]]:
    """`python -m mtlstream serve` on a free port; yields (port, served version)."""
    version = publish(registry, model)
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "MTL_NAMESPACE": namespace,
        "MTL_SERVE_RUNTIME": "torch",
        "MTL_SERVE_POLL_S": "0.2",
    }
    log = tmp_path / "scorer.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mtlstream", "serve", "--port", str(port)],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while not _healthy(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"scorer not healthy: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield port, version
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # uvicorn shuts down gracefully, then re-raises SIGTERM (exit status -15)
    assert proc.returncode in (0, -15), log.read_text()[-2000:]
    assert "scorer stopped" in log.read_text()


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _check(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mtlstream", "serve", "--check", "--port", str(port)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_mtlstream_serve_over_loopback_with_the_client_and_check(
    scorer_process: tuple[int, int], features: FeatureStore
) -> None:
    port, version = scorer_process
    with RankClient(f"http://127.0.0.1:{port}") as client:
        result = client.rank("u1", ["i1", "i2", "i3"], top_k=2, request_id="r-1")
        ok, health = client.health()
        info = client.model()
        with pytest.raises(RankError) as error:
            client.rank("u1", [])
    assert result.model_version == version and len(result.items) == 2
    assert result.request_id == "r-1" and not result.degraded
    assert result.items[0].score >= result.items[1].score
    assert set(result.items[0].tasks) == {"ctr", "cvr", "ctcvr", "ysl"}
    assert ok and health["model_version"] == version and info["model_version"] == version
    assert (error.value.status, error.value.code) == (422, "empty_candidates")
    healthy = _check(port)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert "healthy=True" in healthy.stdout


def test_serve_check_fails_when_nothing_listens() -> None:
    done = _check(free_port())
    assert done.returncode == 1
    assert "healthy=False" in done.stdout


def test_metrics_render_fresh_registries_per_app() -> None:
    from serving.metrics import ServingMetrics

    first, second = ServingMetrics(), ServingMetrics()
    first.errors.labels("x").inc()
    assert b'mtl_serve_errors_total{code="x"} 1.0' in first.render()[0]
    assert b'code="x"' not in second.render()[0]
    first.set_model(3, int(time.time() * 1000) - 5000)
    age = first._model_age()
    assert 4.0 <= age < 60.0
    assert np.isclose(ServingMetrics()._model_age(), -1.0)


async def test_a_tls_url_falls_back_to_redis_pys_pipeline() -> None:
    settings = serving_settings("rediss://127.0.0.1:1/0", "x:", redis_timeout_s=0.1)
    async with running_app(settings) as (app, client):
        state: ServingState = app.state.serving
        assert state.pipe is None
        assert state.reader is not None and state.reader.read_path == "pipeline"
        assert (await client.get("/health")).json()["redis"] == "down"


async def test_the_item_cache_serves_the_same_answers_and_expires(
    redis_url: str,
    namespace: str,
    registry: SnapshotRegistry,
    model: RankingModel,
    features: FeatureStore,
) -> None:
    version = publish(registry, model)
    request = {"user_id": "u1", "candidates": ["i1", "i2", "zz", "i1"]}
    async with running_app(serving_settings(redis_url, namespace)) as (_, client):
        await wait_for_version(client, version)
        uncached = (await client.post("/v1/rank", json=request)).json()
    settings = serving_settings(redis_url, namespace, item_cache_s=0.5)
    async with running_app(settings) as (_, client):
        await wait_for_version(client, version)
        first = (await client.post("/v1/rank", json=request)).json()
        features.write("item", [("i1", {"item_price": 5000.0}, 200)])
        features.write("user", [("u1", {"user_activity": 0.5}, 200)])
        cached = (await client.post("/v1/rank", json=request)).json()
        await asyncio.sleep(0.6)
        expired = (await client.post("/v1/rank", json=request)).json()

    def ctr(body: dict[str, Any], item_id: str) -> float:
        return float(next(i["tasks"]["ctr"] for i in body["items"] if i["item_id"] == item_id))

    assert first == uncached
    # within the TTL the item row is the cached one, the user row is always fresh
    assert ctr(cached, "zz") != ctr(first, "zz")  # user_activity changed for every candidate
    expected = _learner_predictions(
        model,
        [
            {**USER, **ITEMS["i1"], "user_activity": 0.5, "user_id": "u1", "item_id": "i1"},
            {**USER, **ITEMS["i1"], "item_price": 5000.0, "user_activity": 0.5,
             "user_id": "u1", "item_id": "i1"},
        ],
    )  # fmt: skip
    assert ctr(cached, "i1") == pytest.approx(float(expected["ctr"][0]), rel=1e-6)
    assert ctr(expired, "i1") == pytest.approx(float(expected["ctr"][1]), rel=1e-6)
