"""A trivial faust app for the table-recovery test: counts records per key into a Table.

Configured by environment variables so that each test run gets its own app id and topics.
Run as ``python -m tests.integration.faust_counter_app worker``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import faust

app = faust.App(
    os.environ.get("COUNTER_APP_ID", "counter-test"),
    broker=f"kafka://{os.environ.get('KAFKA_BOOTSTRAP_SERVERS', '127.0.0.1:9092')}",
    store="memory://",  # nothing on disk: after a restart the table exists only in its changelog
    topic_partitions=1,
    web_enabled=False,
    datadir=os.environ.get("COUNTER_DATA_DIR", "/tmp/faust-counter"),
)
source = app.topic(
    os.environ.get("COUNTER_SOURCE", "counter-in"), key_type=str, value_serializer="raw"
)
sink = app.topic(
    os.environ.get("COUNTER_SINK", "counter-out"), key_type=str, value_serializer="raw"
)
counts = app.Table("counts", default=int, partitions=1)


@app.agent(source)
async def count(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
    """Count each key and emit the running count."""
    async for key, _value in stream.items():
        counts[key] += 1
        await sink.send(key=key, value=str(counts[key]).encode())
        yield None


if __name__ == "__main__":
    app.main()
