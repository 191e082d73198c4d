"""Settings of the stream worker process (`mtlstream stream`)."""

from __future__ import annotations

from dataclasses import dataclass

from mtlstream.settings import DEFAULT_KAFKA, DEFAULT_REDIS, env_field
from stream.events import (
    CLICKS,
    DEAD_LETTERS,
    FOLLOW_CLICKS,
    IMPRESSIONS,
    SAMPLES,
    DecodeLimits,
    YslSpace,
)
from stream.join import JoinConfig, Mode

__all__ = ["StreamSettings"]

MINUTE_MS = 60_000


@dataclass(frozen=True)
class StreamSettings:
    """Everything the join worker reads from its environment."""

    kafka_bootstrap: str = env_field(DEFAULT_KAFKA, "KAFKA_BOOTSTRAP_SERVERS", "Kafka brokers")
    redis_url: str = env_field(DEFAULT_REDIS, "REDIS_URL", "Redis for the live item counters")
    namespace: str = env_field("mtl:", "MTL_NAMESPACE", "Redis key prefix")
    # faust application id: consumer group, changelog and tick topic names derive from it
    app_id: str = env_field("mtlstream-stream", "MTL_STREAM_APP_ID", "faust app id")
    # partitions of the input topics (all three co-partitioned), samples and internal topics
    partitions: int = env_field(4, "MTL_TOPIC_PARTITIONS", "partitions per topic")
    impressions_topic: str = env_field(IMPRESSIONS, "MTL_IMPRESSIONS_TOPIC", "impressions topic")
    clicks_topic: str = env_field(CLICKS, "MTL_CLICKS_TOPIC", "clicks topic")
    follow_clicks_topic: str = env_field(FOLLOW_CLICKS, "MTL_FOLLOW_CLICKS_TOPIC", "follow-ons")
    samples_topic: str = env_field(SAMPLES, "MTL_SAMPLES_TOPIC", "joined samples (output)")
    dead_letters_topic: str = env_field(DEAD_LETTERS, "MTL_DEAD_LETTERS_TOPIC", "bad input")
    # the join (DESIGN.md section 3); all durations are event time
    click_window_ms: int = env_field(30 * MINUTE_MS, "MTL_CLICK_WINDOW_MS", "W_c")
    follow_window_ms: int = env_field(30 * MINUTE_MS, "MTL_FOLLOW_WINDOW_MS", "W_f")
    allowed_lateness_ms: int = env_field(60_000, "MTL_ALLOWED_LATENESS_MS", "L")
    mode: str = env_field("final", "MTL_JOIN_MODE", "final | early (delayed feedback)")
    early_wait_ms: int = env_field(5 * MINUTE_MS, "MTL_EARLY_WAIT_MS", "early mode wait")
    ysl_space: str = env_field("clicked", "MTL_YSL_SPACE", "ysl mask: clicked | all")
    orphan_wait_ms: int = env_field(5 * MINUTE_MS, "MTL_ORPHAN_WAIT_MS", "orphan wait")
    # wall clock after which an input partition with nothing to read stops holding the watermark
    idle_timeout_ms: int = env_field(10_000, "MTL_IDLE_TIMEOUT_MS", "idle partition timeout")
    # how often each assigned partition gets a tick record (drives expiry when idle)
    tick_interval_s: float = env_field(1.0, "MTL_TICK_INTERVAL_S", "tick interval (s)")
    # records handled per agent iteration (faust take_events), and the longest wait for a batch
    batch_size: int = env_field(2000, "MTL_STREAM_BATCH", "records per batch")
    batch_within_s: float = env_field(0.05, "MTL_STREAM_BATCH_WITHIN_S", "batch wait (s)")
    # input validation
    max_event_bytes: int = env_field(64 * 1024, "MTL_MAX_EVENT_BYTES", "max event size")
    # event times further than this past the wall clock are impossible; -1 turns it off
    # (a simulated world whose clock runs ahead of the wall needs that)
    max_future_skew_ms: int = env_field(3_600_000, "MTL_MAX_FUTURE_SKEW_MS", "future skew")
    # live item counters in Redis
    counters_enabled: bool = env_field(True, "MTL_COUNTERS", "write live item counters")
    # lists of counter events (one list per join batch) per Redis write
    counter_batch: int = env_field(50, "MTL_COUNTER_BATCH", "join batches per Redis write")
    counter_within_s: float = env_field(2.0, "MTL_COUNTER_WITHIN_S", "max wait per batch (s)")
    # operations
    metrics_port: int = env_field(0, "MTL_STREAM_METRICS_PORT", "Prometheus port (0: off)")
    log_every_s: float = env_field(10.0, "MTL_STREAM_LOG_EVERY_S", "status line interval (s)")
    # the status line is also written to Redis under the health key with this TTL
    health_ttl_s: int = env_field(30, "MTL_STREAM_HEALTH_TTL_S", "health key TTL (s)")
    data_dir: str = env_field(".mtlstream/stream", "MTL_STREAM_DATA_DIR", "faust data dir")
    # faust: the faust app's agent; direct: a batch consumer driving the same join (faster)
    engine: str = env_field("faust", "MTL_STREAM_ENGINE", "faust | direct")

    def join_config(self) -> JoinConfig:
        """The pure join's configuration."""
        mode: Mode = "early" if self.mode == "early" else "final"
        if self.mode not in ("final", "early"):
            raise ValueError(f"MTL_JOIN_MODE must be final or early, got {self.mode!r}")
        space: YslSpace = "all" if self.ysl_space == "all" else "clicked"
        if self.ysl_space not in ("clicked", "all"):
            raise ValueError(f"MTL_YSL_SPACE must be clicked or all, got {self.ysl_space!r}")
        return JoinConfig(
            click_window_ms=self.click_window_ms,
            follow_window_ms=self.follow_window_ms,
            allowed_lateness_ms=self.allowed_lateness_ms,
            mode=mode,
            early_wait_ms=self.early_wait_ms,
            ysl_space=space,
            orphan_wait_ms=self.orphan_wait_ms,
        )

    def decode_limits(self) -> DecodeLimits:
        """What the input decoder accepts."""
        skew = None if self.max_future_skew_ms < 0 else self.max_future_skew_ms
        return DecodeLimits(max_bytes=self.max_event_bytes, max_future_skew_ms=skew)

    @property
    def input_topics(self) -> dict[str, str]:
        """Actual topic name -> the record kind it carries."""
        return {
            self.impressions_topic: IMPRESSIONS,
            self.clicks_topic: CLICKS,
            self.follow_clicks_topic: FOLLOW_CLICKS,
        }

    @property
    def health_process(self) -> str:
        """Process name in the health key ``{namespace}health:stream-{app_id}``."""
        return f"stream-{self.app_id}"

    @property
    def changelog_topic(self) -> str:
        """Compacted topic of the join state (faust's name for the ``join_state`` Table)."""
        return f"{self.app_id}-join_state-changelog"

    @property
    def ticks_topic(self) -> str:
        """Internal topic of tick records, co-partitioned with the inputs."""
        return f"{self.app_id}-ticks"
