"""What the demo watches while it runs, gathered into one :class:`Reading` per refresh.

Sources, all read-only: Kafka end offsets of the run's topics (events/s per topic), the samples
topic itself (a consumer outside any group), the simulator's truth file and served log, the
learner's metrics history (JSONL) and the scorer's ``/v1/model`` and ``/metrics``.

The joins and counters are plain classes over records (:class:`JsonlTail`, :class:`OracleJoin`,
:class:`ServedStats`, :class:`SwapLog`), unit-tested without any service; :class:`Monitor`
wires them to Kafka, files and HTTP.

The oracle scores the same samples the learner scores: each sample is joined with the truth
record of its impression (by ``impression_id``), and the true probabilities go through the
learner's own progressive-validation metrics (:class:`learner.metrics.ProgressiveValidation`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from demo.metrics import (
    AucParts,
    Swap,
    freshness_ms,
    parse_histogram,
    quantiles,
    soft_auc_parts,
)
from learner.metrics import ProgressiveValidation

__all__ = [
    "LATENCY_METRIC",
    "ORACLE_TASKS",
    "TOPIC_KINDS",
    "JsonlTail",
    "Monitor",
    "OracleJoin",
    "Reading",
    "ScorerReading",
    "ServedStats",
    "SwapLog",
]

logger = logging.getLogger(__name__)

#: The run's topics the view counts, by kind.
TOPIC_KINDS = ("impressions", "clicks", "follow_clicks", "samples", "dead_letters")
#: Tasks and kinds of the learner's default model, which the oracle mirrors.
ORACLE_TASKS = {"ctr": "binary", "cvr": "binary", "ctcvr": "binary", "ysl": "count"}
#: The scorer's request latency histogram.
LATENCY_METRIC = "mtl_serve_request_seconds"
# truth field -> task the true probability predicts
_TRUTH_OF = {"ctr": "p_click", "cvr": "p_conv", "ctcvr": "p_ctcvr", "ysl": "exp_ysl"}


class JsonlTail:
    """Returns the complete JSON lines appended to a file since the previous call."""

    def __init__(self, path: Path, max_bytes: int = 16 << 20) -> None:
        self.path = path
        self.max_bytes = max_bytes  # read at most this much per call
        self.bad = 0  # lines that were not JSON objects
        self._offset = 0
        self._rest = b""

    def read(self) -> list[dict[str, Any]]:
        """New whole lines as dicts (a partial last line waits for its newline)."""
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read(self.max_bytes)
        except FileNotFoundError:
            return []
        self._offset += len(data)
        lines = (self._rest + data).split(b"\n")
        self._rest = lines.pop()
        out: list[dict[str, Any]] = []
        for line in lines:
            if not line.strip():
                continue
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError:
                value = None
            if isinstance(value, dict):
                out.append(value)
            else:
                self.bad += 1
        return out


def _impression_of(sample: Mapping[str, Any]) -> str:
    sample_id = str(sample["sample_id"])
    return sample_id.rpartition("#")[0] if sample.get("revision") else sample_id


class OracleJoin:
    """Joins samples with truth records by impression id and scores the truth on them.

    Truth records come first as a rule (they are written when the impression happens, the
    sample only when its window closes); a sample whose truth is not there yet waits for up to
    ``max_wait`` calls of :meth:`add_samples`, then counts as ``unmatched``.
    """

    def __init__(self, window: int, max_wait: int = 100, max_truth: int = 2_000_000) -> None:
        self.metrics = ProgressiveValidation(ORACLE_TASKS, window)
        self.max_wait = max_wait
        self.max_truth = max_truth  # truth records kept; the oldest go first
        self.truth: dict[str, Mapping[str, Any]] = {}
        self.pending: deque[tuple[int, Mapping[str, Any]]] = deque()  # (call number, sample)
        self.samples = 0  # samples seen
        self.matched = 0  # samples scored by the oracle
        self.unmatched = 0  # samples given up on
        self.emitted_ms: list[int] = []  # emitted_at of every sample, for freshness
        self._calls = 0

    def add_truth(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Remember truth records (``impression_id``, ``p_click``, ``p_conv``, ...)."""
        for record in records:
            self.truth[str(record["impression_id"])] = record
        while len(self.truth) > self.max_truth:
            del self.truth[next(iter(self.truth))]

    def add_samples(self, samples: Iterable[Mapping[str, Any]]) -> None:
        """Take new samples (plain JSON layout), then score every pending one whose truth is in."""
        self._calls += 1
        for sample in samples:
            self.samples += 1
            self.emitted_ms.append(int(sample["emitted_at"]))
            self.pending.append((self._calls, sample))
        ready: list[tuple[Mapping[str, Any], Mapping[str, Any]]] = []
        waiting: deque[tuple[int, Mapping[str, Any]]] = deque()
        for call, sample in self.pending:
            truth = self.truth.get(_impression_of(sample))
            if truth is not None:
                ready.append((sample, truth))
            elif self._calls - call >= self.max_wait:
                self.unmatched += 1
            else:
                waiting.append((call, sample))
        self.pending = waiting
        if ready:
            self._score(ready)

    def _score(self, pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> None:
        labels = np.array(
            [
                [s["labels"]["click"], s["labels"]["conversion"], s["labels"]["ysl"]]
                for s, _ in pairs
            ],
            dtype=np.float64,
        )  # (N, 3)
        masks = {
            t: np.array([s["masks"][t] for s, _ in pairs], dtype=np.float64) for t in _TRUTH_OF
        }
        preds = {
            t: np.array([float(truth[key]) for _, truth in pairs], dtype=np.float64)
            for t, key in _TRUTH_OF.items()
        }
        click, conversion, ysl = labels.T
        y = {"ctr": click, "cvr": conversion, "ctcvr": click * conversion, "ysl": ysl}
        self.metrics.update(preds, y, masks)
        self.matched += len(pairs)


@dataclass
class ServedStats:
    """Counts of the served log and the soft AUC of served scores against true P(click)."""

    window: int = 200  # requests in the rolling AUC
    requests: int = 0
    fallbacks: Counter[str] = field(default_factory=Counter)
    by_version: Counter[int] = field(default_factory=Counter)
    total: AucParts = field(default_factory=lambda: AucParts(0.0, 0.0))
    recent: deque[AucParts] = field(default_factory=deque)
    latency_ms: deque[float] = field(default_factory=lambda: deque(maxlen=1000))

    def add(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Count served-log records and fold their ranking quality in."""
        for record in records:
            self.requests += 1
            self.latency_ms.append(float(record.get("latency_ms") or 0.0))
            version, scores = record.get("model_version"), record.get("scores")
            if version is None or scores is None or any(x is None for x in scores):
                self.fallbacks[str(record.get("fallback") or "error")] += 1
                continue
            self.by_version[int(version)] += 1
            parts = soft_auc_parts(scores, record["p_click"])
            self.total = self.total + parts
            self.recent.append(parts)
            if len(self.recent) > self.window:
                self.recent.popleft()

    @property
    def auc_recent(self) -> float:
        """Soft AUC of the last ``window`` model-served requests."""
        total = AucParts(0.0, 0.0)
        for parts in self.recent:
            total = total + parts
        return total.auc


class SwapLog:
    """Every version the scorer served and when, merged from successive ``/v1/model`` answers."""

    def __init__(self) -> None:
        self.swaps: dict[tuple[int, int], Swap] = {}

    def add(self, entries: Iterable[Mapping[str, Any]]) -> None:
        """Merge the ``swaps`` list of one ``/v1/model`` answer."""
        for entry in entries:
            try:
                swap = Swap.from_dict(entry)
            except (KeyError, TypeError, ValueError):
                continue
            self.swaps[(swap.version, swap.loaded_at_ms)] = swap

    def all(self) -> list[Swap]:
        """The swaps, in serving order."""
        return sorted(self.swaps.values(), key=lambda s: (s.loaded_at_ms, s.version))

    @property
    def versions(self) -> list[int]:
        """Distinct versions served, in serving order."""
        return list(dict.fromkeys(s.version for s in self.all()))


@dataclass(frozen=True)
class ScorerReading:
    """One look at the scorer."""

    version: int | None  # served version, None before the first model
    age_s: float | None  # since that snapshot was published
    buckets: list[tuple[float, float]]  # request latency histogram, cumulative (le, count)
    requests: float  # requests observed by the histogram


@dataclass(frozen=True)
class Reading:
    """Everything the view shows at one moment (counters are cumulative; the view diffs them)."""

    t: float  # seconds since the demo started
    offsets: Mapping[str, int]  # topic kind -> end offset, summed over partitions
    oracle: Mapping[str, float]  # ProgressiveValidation.get() of the truth
    oracle_samples: int  # samples the oracle scored
    learner: Mapping[str, Any] | None  # the learner's newest metrics-history record
    scorer: ScorerReading | None  # None while the scorer does not answer
    served_requests: int
    served_fallbacks: Mapping[str, int]
    served_auc: float  # soft AUC of the last requests served by a model
    freshness: tuple[float, float, float, int]  # median, p95, max (s) and samples covered


class Monitor:
    """Gathers a :class:`Reading` from Kafka, the run's files and the scorer."""

    def __init__(
        self,
        bootstrap: str,
        topics: Mapping[str, str],
        truth_file: Path,
        served_log: Path,
        learner_history: Path,
        scorer_url: str,
        metrics_window: int,
    ) -> None:
        self.bootstrap = bootstrap
        self.topics = dict(topics)  # kind -> topic name
        self.truth = JsonlTail(truth_file)
        self.served_tail = JsonlTail(served_log)
        self.history_tail = JsonlTail(learner_history)
        self.scorer_url = scorer_url.rstrip("/")
        self.oracle = OracleJoin(metrics_window)
        self.served = ServedStats()
        self.swaps = SwapLog()
        self.learner: dict[str, Any] | None = None
        self.history: list[dict[str, Any]] = []  # every learner history record
        self.started = time.monotonic()
        self._http = httpx.Client(timeout=1.0)
        self._consumer: Any = None
        self._partitions: list[Any] = []
        self._last_offsets: dict[str, int] = dict.fromkeys(self.topics, 0)

    def _connect(self) -> bool:
        """Open the samples consumer once every topic has its partitions (created by then)."""
        if self._consumer is not None:
            return True
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            client_id="mtl-demo-monitor",
            consumer_timeout_ms=100,
        )
        partitions = []
        for topic in self.topics.values():
            ids = consumer.partitions_for_topic(topic)
            if not ids:
                consumer.close()
                return False
            partitions += [TopicPartition(topic, p) for p in sorted(ids)]
        self._partitions = partitions
        samples = [tp for tp in partitions if tp.topic == self.topics["samples"]]
        consumer.assign(samples)
        consumer.seek_to_beginning(*samples)
        self._consumer = consumer
        return True

    def _offsets(self) -> dict[str, int]:
        from kafka.errors import KafkaError

        try:
            ends = self._consumer.end_offsets(self._partitions)
        except (KafkaError, KeyError) as exc:  # a partition without a leader yet: next time
            logger.debug("end offsets not available: %r", exc)
            return dict(self._last_offsets)
        totals = dict.fromkeys(self.topics, 0)
        kind_of = {name: kind for kind, name in self.topics.items()}
        for tp, end in ends.items():
            totals[kind_of[tp.topic]] += int(end)
        self._last_offsets = totals
        return totals

    def _samples(self, budget_s: float = 0.2) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + budget_s
        while time.monotonic() < deadline:
            batches = self._consumer.poll(timeout_ms=20, max_records=5000)
            if not batches:
                break
            for records in batches.values():
                for record in records:
                    try:
                        value = orjson.loads(record.value)
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(value, dict) and "emitted_at" in value:
                        out.append(value)
        return out

    def _scorer(self) -> ScorerReading | None:
        try:
            model = self._http.get(f"{self.scorer_url}/v1/model")
            text = self._http.get(f"{self.scorer_url}/metrics").text
        except httpx.HTTPError:
            return None
        info: dict[str, Any] | None = None
        if model.status_code == 200:
            info = orjson.loads(model.content)
            self.swaps.add(info.get("swaps") or [])
        buckets, count = parse_histogram(text, LATENCY_METRIC)
        version = None if info is None else info.get("model_version")
        age = None if info is None else info.get("age_s")
        return ScorerReading(
            None if version is None else int(version),
            None if age is None else float(age),
            buckets,
            count,
        )

    def freshness(self) -> tuple[float, float, float, int]:
        """Median, p95 and max freshness (s) over the samples a served snapshot covers."""
        fresh = freshness_ms(self.oracle.emitted_ms, self.swaps.all()) / 1000.0
        n = int(np.isfinite(fresh).sum())
        median, p95, worst = quantiles(fresh)
        return median, p95, worst, n

    def poll(self) -> Reading:
        """Read every source once and return the combined reading."""
        offsets = dict(self._last_offsets)
        self.oracle.add_truth(self.truth.read())
        if self._connect():
            offsets = self._offsets()
            self.oracle.add_samples(self._samples())
        self.served.add(self.served_tail.read())
        history = self.history_tail.read()
        if history:
            self.history.extend(history)
            self.learner = history[-1]
        scorer = self._scorer()
        return Reading(
            t=time.monotonic() - self.started,
            offsets=offsets,
            oracle=self.oracle.metrics.get(),
            oracle_samples=self.oracle.matched,
            learner=self.learner,
            scorer=scorer,
            served_requests=self.served.requests,
            served_fallbacks=dict(self.served.fallbacks),
            served_auc=self.served.auc_recent,
            freshness=self.freshness(),
        )

    def close(self) -> None:
        """Close the Kafka consumer and the HTTP client."""
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        self._http.close()
