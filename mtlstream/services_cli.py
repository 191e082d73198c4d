"""`mtlstream services up|down|status|smoke|fetch`: the local Kafka broker and Redis server."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import uuid
from pathlib import Path

from mtlstream import services
from mtlstream.settings import from_env

__all__ = ["configure", "main", "smoke"]

logger = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the `services` arguments."""
    parser.add_argument("action", choices=["up", "down", "status", "smoke", "fetch"])
    parser.add_argument("--data-dir", type=str, help="state directory (env MTL_DATA_DIR)")
    parser.add_argument("--kafka-port", type=int, help="Kafka client port (env MTL_KAFKA_PORT)")
    parser.add_argument(
        "--kafka-controller-port",
        type=int,
        help="KRaft controller port (MTL_KAFKA_CONTROLLER_PORT)",
    )
    parser.add_argument("--redis-port", type=int, help="Redis port (env MTL_REDIS_PORT)")


def smoke(settings: services.ServicesSettings) -> str:
    """Round-trip one record through Kafka and one hash through Redis; return a summary line."""
    import redis
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
    from kafka.admin import NewTopic

    started = time.perf_counter()
    topic = f"mtl_smoke_{uuid.uuid4().hex[:8]}"
    payload = uuid.uuid4().bytes
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="mtl-smoke")
    admin.create_topics([NewTopic(topic, 1, 1)])
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    producer.send(topic, key=b"smoke", value=payload).get(timeout=30)
    producer.close()
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=30_000,
    )
    got = next(iter(consumer)).value
    consumer.close()
    admin.delete_topics([topic])
    admin.close()
    client = redis.Redis.from_url(settings.redis_url)
    pipe = client.pipeline(transaction=False)
    pipe.hset("mtl:smoke", mapping={"payload": payload})
    pipe.hget("mtl:smoke", "payload")
    pipe.delete("mtl:smoke")
    redis_back = pipe.execute()[1]
    client.close()
    kafka_ok, redis_ok = got == payload, redis_back == payload
    elapsed = time.perf_counter() - started
    return (
        f"smoke kafka={'ok' if kafka_ok else 'FAIL'} redis={'ok' if redis_ok else 'FAIL'} "
        f"seconds={elapsed:.2f} ok={kafka_ok and redis_ok}"
    )


def main(args: argparse.Namespace) -> int:
    """Run one `services` action."""
    settings = from_env(
        services.ServicesSettings,
        data_dir=None if args.data_dir is None else Path(args.data_dir),
        kafka_port=args.kafka_port,
        kafka_controller_port=args.kafka_controller_port,
        redis_port=args.redis_port,
    )
    out = sys.stdout
    if args.action == "up":
        started = time.perf_counter()
        for st in services.up(settings):
            out.write(st.line() + "\n")
        out.write(f"KAFKA_BOOTSTRAP_SERVERS={settings.kafka_bootstrap}\n")
        out.write(f"REDIS_URL={settings.redis_url}\n")
        logger.info("services up in %.1fs", time.perf_counter() - started)
        return 0
    if args.action == "down":
        stopped = services.down(settings)
        out.write(f"stopped: {', '.join(stopped) or 'nothing was running'}\n")
        return 0
    if args.action == "fetch":
        out.write(f"kafka jars: {services.ensure_kafka_jars(settings)}\n")
        return 0
    if args.action == "status":
        rows = services.status(settings)
        for st in rows:
            out.write(st.line() + "\n")
        return 0 if all(st.running for st in rows) else 1
    line = smoke(settings)
    out.write(line + "\n")
    return 0 if line.endswith("ok=True") else 1
