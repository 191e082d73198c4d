"""Latency and throughput of the scorer over loopback HTTP with real Redis, beside a naive baseline.

For each configuration the scorer runs as its own process (``python -m mtlstream serve``) against
a real Redis holding 1,000 users and 20,000 items (2 % of requested candidates are unknown), with
the default PLE model (~8.5 M parameters) published through the snapshot registry. A client in
this process sends pre-built requests over keep-alive raw sockets (so the client costs little of
the 2 cores) and measures, per candidate count:

- latency at concurrency 1: p50 / p99 / mean over ``--requests`` requests (capped by time);
- throughput: requests/s with ``--concurrency`` connections for ``--throughput-s`` seconds;
- the server's own mean time per stage (features = the Redis read, inference = encode + model +
  fusion), from its /metrics.

Configurations (``--configs``):

- ``naive``: one awaited Redis call (HGETALL) per key, torch eager: the baseline;
- ``pipeline-torch``: one redis-py pipeline of HGETALLs, torch eager;
- ``raw-torch``: one round trip of HMGETs of the model's fields over feature_store.pipe's lean
  RESP client (hiredis parsing), torch eager;
- ``raw-onnx``: the same with ONNX Runtime (the default configuration);
- ``raw-onnx-offload``: the same, inference in a worker thread;
- ``raw-onnx-cache1s``: raw-onnx with the optional 1 s item-row cache (only the user and the items
  not seen within the last second are read; 20,000 items at ~250 requests/s are nearly all
  cached, so this is its best case).

Before the HTTP runs, the model alone is timed in-process: torch eager vs ONNX Runtime at each
batch size, which is the measurement behind ``MTL_SERVE_RUNTIME=auto`` choosing ONNX.

Goals (2-core machine, 500 candidates): p50 <= 4 ms, p99 <= 12 ms, >= 150 requests/s.

Usage: ``.venv/bin/python benchmarks/serving.py [--quick] [--sizes 100,500,1000]``
(Redis: ``REDIS_URL`` if set, else a private redis-server on a free port.)
"""

# ruff: noqa: E402  (the project imports must come after the sys.path fix below)
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder leads sys.path, so `import serving` / `import learner` would
# import benchmarks/serving.py or benchmarks/learner.py instead of the packages: drop the folder.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import numpy as np
import orjson
import redis
import safetensors.torch
import torch

from feature_store.registry import SnapshotRegistry
from feature_store.store import FeatureStore, FeatureWrite
from learner.features import encode_rows
from learner.models import RankingModel, build_model
from mtlstream import services

REPO = Path(__file__).resolve().parents[1]

CONFIGS: dict[str, dict[str, str]] = {
    "naive": {"MTL_SERVE_READ_PATH": "naive", "MTL_SERVE_RUNTIME": "torch"},
    "pipeline-torch": {"MTL_SERVE_READ_PATH": "pipeline", "MTL_SERVE_RUNTIME": "torch"},
    "raw-torch": {"MTL_SERVE_READ_PATH": "raw", "MTL_SERVE_RUNTIME": "torch"},
    "raw-onnx": {"MTL_SERVE_READ_PATH": "raw", "MTL_SERVE_RUNTIME": "onnx"},
    "raw-onnx-offload": {
        "MTL_SERVE_READ_PATH": "raw",
        "MTL_SERVE_RUNTIME": "onnx",
        "MTL_SERVE_OFFLOAD": "1",
    },
    "raw-onnx-cache1s": {
        "MTL_SERVE_READ_PATH": "raw",
        "MTL_SERVE_RUNTIME": "onnx",
        "MTL_SERVE_ITEM_CACHE_S": "1",
    },
}


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def redis_server() -> Iterator[str]:
    """REDIS_URL when set, else a private redis-server (stopped afterwards)."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    with tempfile.TemporaryDirectory(prefix="mtl-bench-") as tmp:
        settings = services.ServicesSettings(data_dir=Path(tmp), redis_port=free_port())
        status = services.start_redis(settings)
        try:
            yield status.address
        finally:
            services.down(settings)


# --- data ----------------------------------------------------------------------------------------


def populate(client: redis.Redis, namespace: str, users: int, items: int, seed: int) -> None:
    """Write users and items with the simulator's feature names."""
    rng = random.Random(seed)
    store = FeatureStore(client, namespace)
    store.write(
        "user",
        [
            FeatureWrite(
                f"u{k}", {"user_segment": f"s{k % 16}", "user_activity": rng.random() * 10}, 1
            )
            for k in range(users)
        ],
    )
    for start in range(0, items, 2000):
        store.write(
            "item",
            [
                FeatureWrite(
                    f"i{k}",
                    {
                        "item_category": f"c{k % 50}",
                        "item_price": round(rng.random() * 100, 2),
                        "item_age_h": round(rng.random() * 48, 2),
                        "item_ctr_1h": round(rng.random() * 0.2, 4),
                    },
                    1,
                )
                for k in range(start, min(items, start + 2000))
            ],
        )


def publish_model(client: redis.Redis, namespace: str, seed: int) -> RankingModel:
    """Publish the default PLE model (normalisation statistics fitted on plausible values)."""
    torch.manual_seed(seed)
    model = build_model({})
    rows = [
        {"user_activity": 5.0, "item_price": 50.0 + k % 50, "item_age_h": 24.0, "item_ctr_1h": 0.1}
        for k in range(256)
    ]
    model.encoder.norm.update(torch.from_numpy(encode_rows(model.args.features, rows).dense))
    model.eval()
    registry = SnapshotRegistry(client, "ple", namespace)
    meta = {"model_args": model.model_args, "step": 0, "metrics": {}}
    registry.publish(safetensors.torch.save(model.state_dict()), meta)
    return model


def request_bodies(size: int, users: int, items: int, count: int, seed: int) -> list[bytes]:
    """Pre-built request bodies: a random user, ``size`` random candidates (2 % unknown)."""
    rng = random.Random(seed + size)
    bodies = []
    for _ in range(count):
        cands = [
            f"i{rng.randrange(items)}" if rng.random() > 0.02 else f"new{rng.randrange(10**6)}"
            for _ in range(size)
        ]
        user = f"u{rng.randrange(users)}"
        bodies.append(orjson.dumps({"user_id": user, "candidates": cands}))
    return bodies


# --- the client ----------------------------------------------------------------------------------


class Connection:
    """A minimal keep-alive HTTP/1.1 client on a raw socket (cheap for a 2-core machine)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def _recv(self) -> None:
        chunk = self.sock.recv(1 << 18)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk

    def post(self, body: bytes) -> int:
        """POST /v1/rank; return the HTTP status once the whole answer arrived."""
        head = b"POST /v1/rank HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        self.sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        while b"\r\n\r\n" not in self.buf:
            self._recv()
        header, _, rest = self.buf.partition(b"\r\n\r\n")
        match = re.search(rb"(?i)content-length:\s*(\d+)", header)
        length = int(match.group(1)) if match else 0
        self.buf = rest
        while len(self.buf) < length:
            self._recv()
        self.buf = self.buf[length:]
        return int(header[9:12])

    def close(self) -> None:
        self.sock.close()


@dataclass
class Result:
    config: str
    size: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    n: int
    rps: float
    features_ms: float
    inference_ms: float


def latency(port: int, bodies: list[bytes], requests: int, max_s: float) -> list[float]:
    """Sequential requests on one connection; latencies in ms."""
    conn = Connection(port)
    times: list[float] = []
    deadline = time.perf_counter() + max_s
    try:
        for k in range(requests):
            started = time.perf_counter()
            status = conn.post(bodies[k % len(bodies)])
            times.append((time.perf_counter() - started) * 1000)
            if status != 200:
                raise RuntimeError(f"scorer answered {status}")
            if time.perf_counter() > deadline:
                break
    finally:
        conn.close()
    return times


def throughput(port: int, bodies: list[bytes], concurrency: int, seconds: float) -> float:
    """Requests/s with ``concurrency`` connections sending back to back."""
    done = [0] * concurrency
    failures: list[str] = []
    stop = time.perf_counter() + seconds

    def worker(k: int) -> None:
        conn = Connection(port)
        try:
            while time.perf_counter() < stop:
                if conn.post(bodies[(k * 7 + done[k]) % len(bodies)]) != 200:
                    failures.append("non-200")
                done[k] += 1
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed")
    return sum(done) / (time.perf_counter() - started)


def stage_means(port: int) -> dict[str, tuple[float, float]]:
    """(sum, count) of the scorer's stage histogram, by stage."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    out: dict[str, tuple[float, float]] = {}
    for stage in ("features", "inference"):
        total = re.search(rf'mtl_serve_stage_seconds_sum{{stage="{stage}"}} (\S+)', text)
        count = re.search(rf'mtl_serve_stage_seconds_count{{stage="{stage}"}} (\S+)', text)
        out[stage] = (
            float(total.group(1)) if total else 0.0,
            float(count.group(1)) if count else 0.0,
        )
    return out


def _mean_ms(before: tuple[float, float], after: tuple[float, float]) -> float:
    count = after[1] - before[1]
    return (after[0] - before[0]) / count * 1000 if count else float("nan")


# --- the scorer process --------------------------------------------------------------------------


@contextmanager
def scorer(config: str, redis_url: str, namespace: str, log: Path) -> Iterator[int]:
    """Run ``mtlstream serve`` with a configuration; yield its port once it serves the model."""
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "MTL_NAMESPACE": namespace,
        "MTL_SERVE_PORT": str(port),
        "MTL_SERVE_MAX_CANDIDATES": "1000",
        **CONFIGS[config],
    }
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mtlstream", "--log-level", "WARNING", "serve"],
            env=env,
            stdout=out,
            stderr=out,
            cwd=REPO,
        )
    try:
        wait_ready(port, CONFIGS[config]["MTL_SERVE_RUNTIME"], proc)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_ready(
    port: int, runtime: str, proc: subprocess.Popen[bytes], timeout_s: float = 180
) -> None:
    """Wait for /health 200 with the expected runtime (an ONNX export takes seconds)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"scorer exited with {proc.returncode}; see its log")
        try:
            response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            if response.status_code == 200 and response.json()["runtime"] == runtime:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"scorer not ready with runtime={runtime} after {timeout_s}s")


def run_config(
    config: str, args: argparse.Namespace, redis_url: str, namespace: str
) -> list[Result]:
    """Measure one configuration at every size."""
    results = []
    with scorer(config, redis_url, namespace, args.log) as port:
        for size in args.sizes:
            bodies = request_bodies(size, args.users, args.items, 64, args.seed)
            latency(port, bodies, args.warmup, args.max_s)
            before = stage_means(port)
            times = latency(port, bodies, args.requests, args.max_s)
            after = stage_means(port)
            rps = throughput(port, bodies, args.concurrency, args.throughput_s)
            ordered = sorted(times)
            results.append(
                Result(
                    config,
                    size,
                    statistics.median(times),
                    ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
                    statistics.fmean(times),
                    len(times),
                    rps,
                    _mean_ms(before["features"], after["features"]),
                    _mean_ms(before["inference"], after["inference"]),
                )
            )
            print_row(results[-1])
    return results


# --- model alone: torch eager vs ONNX Runtime ----------------------------------------------------


def model_alone(model: RankingModel, sizes: list[int], repeats: int) -> None:
    """Time torch eager and ONNX Runtime on the same batches (1 thread each), in-process."""
    from serving.runtime import OnnxExporter, TorchRuntime, onnx_available

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    torch_rt = TorchRuntime(model)
    started = time.perf_counter()
    onnx_rt = OnnxExporter(threads=1).runtime(model) if onnx_available() else None
    export_s = time.perf_counter() - started
    print(
        f"\nmodel alone (1 thread, median of {repeats}); first ONNX export + verify {export_s:.1f}s"
    )
    print(f"{'batch':>6} {'torch_ms':>9} {'onnx_ms':>8} {'speedup':>8} {'max_diff':>9}")
    for size in sizes:
        rows = [
            {"user_id": f"u{rng.integers(1000)}", "item_id": f"i{k}", "item_price": float(k % 97)}
            for k in range(size)
        ]
        batch = encode_rows(model.args.features, rows)
        timings = {}
        for name, rt in (("torch", torch_rt), ("onnx", onnx_rt)):
            if rt is None:
                continue
            for _ in range(10):
                rt.predict(batch)
            samples = []
            for _ in range(repeats):
                t = time.perf_counter()
                rt.predict(batch)
                samples.append((time.perf_counter() - t) * 1000)
            timings[name] = statistics.median(samples)
        diff = (
            float(np.abs(onnx_rt.predict(batch) - torch_rt.predict(batch)).max())
            if onnx_rt is not None
            else float("nan")
        )
        onnx_ms = timings.get("onnx", float("nan"))
        print(
            f"{size:>6} {timings['torch']:>9.3f} {onnx_ms:>8.3f} "
            f"{timings['torch'] / onnx_ms:>7.2f}x {diff:>9.2g}"
        )


# --- report --------------------------------------------------------------------------------------

_HEADER = (
    f"{'config':<20} {'cands':>5} {'p50_ms':>7} {'p99_ms':>7} {'mean_ms':>7} {'n':>5} "
    f"{'rps':>7} {'feat_ms':>7} {'infer_ms':>8}"
)


def print_row(r: Result) -> None:
    print(
        f"{r.config:<20} {r.size:>5} {r.p50_ms:>7.2f} {r.p99_ms:>7.2f} {r.mean_ms:>7.2f} "
        f"{r.n:>5} {r.rps:>7.1f} {r.features_ms:>7.2f} {r.inference_ms:>8.2f}",
        flush=True,
    )


def print_goals(results: list[Result]) -> None:
    """Compare the 500-candidate rows of the ONNX configurations with the goals."""
    naive = {r.size: r for r in results if r.config == "naive"}
    for r in results:
        if r.size != 500 or r.config not in ("raw-onnx", "raw-onnx-cache1s"):
            continue
        checks = [
            ("p50 <= 4 ms", r.p50_ms <= 4.0, f"{r.p50_ms:.2f} ms"),
            ("p99 <= 12 ms", r.p99_ms <= 12.0, f"{r.p99_ms:.2f} ms"),
            (">= 150 requests/s", r.rps >= 150, f"{r.rps:.0f}/s"),
        ]
        print(f"\ngoals ({r.config}, 500 candidates):")
        for name, ok, value in checks:
            print(f"  {name:<18} {value:>10}  {'met' if ok else 'NOT met'}")
        if 500 in naive:
            print(f"  p50 speedup over the naive baseline: {naive[500].p50_ms / r.p50_ms:.1f}x")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,500,1000", help="candidate counts")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="configurations to run")
    parser.add_argument("--requests", type=int, default=400, help="latency requests per size")
    parser.add_argument("--warmup", type=int, default=40, help="warm-up requests per size")
    parser.add_argument("--max-s", type=float, default=15.0, help="time cap per latency run (s)")
    parser.add_argument("--concurrency", type=int, default=4, help="throughput connections")
    parser.add_argument("--throughput-s", type=float, default=4.0, help="throughput run (s)")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="fewer requests, shorter runs")
    parser.add_argument("--no-model-alone", action="store_true", help="skip the in-process timing")
    parser.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "mtl-bench.log")
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.configs = [c for c in args.configs.split(",") if c]
    unknown = set(args.configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}; known: {sorted(CONFIGS)}")
    if args.quick:
        args.requests, args.warmup, args.max_s, args.throughput_s = 150, 20, 6.0, 2.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"cpus={os.cpu_count()} load={os.getloadavg()[0]:.2f} scorer log: {args.log}")
    with redis_server() as redis_url:
        namespace = f"bench{uuid.uuid4().hex[:8]}:"
        client = redis.Redis.from_url(redis_url)
        try:
            populate(client, namespace, args.users, args.items, args.seed)
            model = publish_model(client, namespace, args.seed)
            if not args.no_model_alone:
                model_alone(model, args.sizes, 50 if args.quick else 200)
            conc = args.concurrency
            print(f"\nover loopback HTTP (latency: concurrency 1; rps: concurrency {conc})")
            print(_HEADER)
            results: list[Result] = []
            for config in args.configs:
                results += run_config(config, args, redis_url, namespace)
            print_goals(results)
            print(f"load at end={os.getloadavg()[0]:.2f}")
        finally:
            keys = list(client.scan_iter(match=f"{namespace}*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
