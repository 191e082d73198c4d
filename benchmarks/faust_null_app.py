"""A faust app whose agent only counts: the ceiling of faust's consumer path on this machine.

Run by ``benchmarks/stream_e2e.py`` beside the real worker, over the same three input topics
with the same batching (``take_events``) and consumer settings as ``stream.app``. It prints
``RATE <events/s> <seconds>`` once it has seen ``BENCH_EVENTS`` events, and exits.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import faust

TOPICS = os.environ["BENCH_TOPICS"].split(",")
EVENTS = int(os.environ["BENCH_EVENTS"])
BATCH = int(os.environ.get("MTL_STREAM_BATCH", "2000"))

app = faust.App(
    os.environ["BENCH_APP_ID"],
    broker=f"kafka://{os.environ['KAFKA_BOOTSTRAP_SERVERS']}",
    store="memory://",
    web_enabled=False,
    autodiscover=False,
    datadir=os.environ["BENCH_DATA_DIR"],
    consumer_auto_offset_reset="earliest",
    stream_buffer_maxsize=16384,
    broker_commit_every=10_000,
    broker_commit_interval=1.0,
)
inputs = app.topic(*TOPICS, key_type=bytes, value_type=bytes, value_serializer="raw")


async def count(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
    """Count events in batches; report the rate from the first batch to the last event."""
    seen, start = 0, 0.0
    batches = cast(Any, stream).take_events
    async for events in batches(BATCH, within=0.05):
        start = start or time.perf_counter()
        seen += len(events)
        if seen >= EVENTS:
            elapsed = time.perf_counter() - start
            print(f"RATE {seen / elapsed:.0f} {elapsed:.3f}", flush=True)
            os._exit(0)  # the measurement is done: no graceful shutdown to wait for
        yield None


app.agent(inputs)(count)

if __name__ == "__main__":
    app.main()
