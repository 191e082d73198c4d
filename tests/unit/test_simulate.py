"""Unit tests of the synthetic world and the traffic simulator (no Kafka)."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from stream.simulate import (
    BAD_REASONS,
    Pacer,
    SimConfig,
    SimRecord,
    SimStats,
    generate,
    inject_faults,
    produce,
    read_log,
    read_truth,
    run,
    write_log,
)
from stream.world import HOUR_MS, Request, World, WorldConfig

SMALL = WorldConfig(seed=11, n_users=300, n_items=400)
EVENT_FIELDS = {
    "impressions": {
        "impression_id",
        "request_id",
        "user_id",
        "item_id",
        "ts",
        "position",
        "features",
        "context",
    },
    "clicks": {"impression_id", "ts", "click_id"},
    "follow_clicks": {"impression_id", "ts", "follow_id", "item_id"},
    "sim_truth": {"impression_id", "ts", "p_click", "p_conv", "p_ctcvr", "exp_ysl"},
}
CATEGORICAL = {"user_id", "item_id", "user_segment", "item_category"}
DENSE = {"user_activity", "item_price", "item_age_h", "item_ctr_1h"}


def records_of(world: WorldConfig, n: int, **settings: Any) -> list[SimRecord]:
    return list(generate(SimConfig(world=world, max_impressions=n, duration_s=None, **settings)))


def by_topic(records: list[SimRecord]) -> defaultdict[str, list[dict[str, Any]]]:
    out: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
    for topic, _, value in records:
        out[topic].append(value)
    return out


def labels(
    records: list[SimRecord],
) -> tuple[dict[str, dict[str, Any]], Counter[str], Counter[str]]:
    """Truth per impression, clicks per impression, follow-ons per impression (no windows)."""
    topics = by_topic(records)
    truth = {t["impression_id"]: t for t in topics["sim_truth"]}
    clicks = Counter(c["impression_id"] for c in topics["clicks"])
    follows = Counter(f["impression_id"] for f in topics["follow_clicks"])
    return truth, clicks, follows


@pytest.fixture(scope="module")
def big_run() -> list[SimRecord]:
    """About 20k impressions of the default behaviour, shared by the rate checks."""
    return records_of(dataclasses.replace(SMALL, n_users=2000, n_items=1000), 20_000)


# --- determinism, order, record shapes ---------------------------------------------------


def test_same_seed_gives_same_records_and_another_seed_does_not() -> None:
    first = records_of(SMALL, 300)
    assert first == records_of(SMALL, 300)
    assert first != records_of(dataclasses.replace(SMALL, seed=12), 300)


def test_records_are_in_event_time_order_and_keyed_by_impression() -> None:
    records = records_of(SMALL, 2000)
    stamps = [value["ts"] for _, _, value in records]
    assert stamps == sorted(stamps)
    assert all(key == value["impression_id"] for _, key, value in records)
    impressions = {v["impression_id"]: v["ts"] for v in by_topic(records)["impressions"]}
    assert len(impressions) == 2000  # unique ids, exactly max_impressions
    seen: set[str] = set()
    for topic, key, value in records:
        if topic == "impressions":
            seen.add(key)
        else:  # clicks, follow-ons and truth come after (or with) their impression
            assert key in seen and value["ts"] >= impressions[key]


def test_records_have_the_design_fields_and_survive_json() -> None:
    records = records_of(SMALL, 1000)
    topics = by_topic(records)
    assert set(topics) == set(EVENT_FIELDS)
    for topic, _, value in records:
        assert set(value) == EVENT_FIELDS[topic]
        assert isinstance(value["ts"], int) and isinstance(value["impression_id"], str)
        assert orjson.loads(orjson.dumps(value)) == value
    for imp in topics["impressions"]:
        features = imp["features"]
        assert CATEGORICAL <= set(features) <= CATEGORICAL | DENSE
        assert all(isinstance(features[name], str) for name in CATEGORICAL)
        assert all(isinstance(v, float) for k, v in features.items() if k in DENSE)
        assert features["user_id"] == imp["user_id"] and features["item_id"] == imp["item_id"]
        assert 0 <= imp["position"] < SMALL.shown_per_request
    # The live hourly CTR counter fills in once items have been shown.
    assert any("item_ctr_1h" in imp["features"] for imp in topics["impressions"])


def test_duration_bounds_the_impressions_not_their_clicks() -> None:
    config = SimConfig(world=SMALL, duration_s=300.0, target_eps=100.0, speedup=1.0)
    topics = by_topic(list(generate(config)))
    end = SMALL.start_ms + 300_000
    assert topics["impressions"] and max(i["ts"] for i in topics["impressions"]) <= end
    assert max(c["ts"] for c in topics["clicks"]) > end  # late clicks still come
    # ~100 events per simulated second at speedup 1, impressions being most of them.
    events = sum(len(topics[t]) for t in ("impressions", "clicks", "follow_clicks"))
    assert abs(events / (100 * 300) - 1) < 0.1


# --- truth and empirical rates -----------------------------------------------------------


def test_truth_probabilities_are_probabilities(big_run: list[SimRecord]) -> None:
    truth = by_topic(big_run)["sim_truth"]
    p_click = np.array([t["p_click"] for t in truth])
    p_conv = np.array([t["p_conv"] for t in truth])
    assert ((p_click > 0) & (p_click < 1) & (p_conv > 0) & (p_conv < 1)).all()
    assert np.allclose([t["p_ctcvr"] for t in truth], p_click * p_conv)
    assert (np.array([t["exp_ysl"] for t in truth]) >= p_conv).all()  # >= 1 follow-on if any
    assert p_click.std() > 0.01 and p_conv.std() > 0.05  # the world is not flat


def test_empirical_click_rate_matches_truth(big_run: list[SimRecord]) -> None:
    truth, clicks, _ = labels(big_run)
    clicked = np.array([clicks[i] > 0 for i in truth], dtype=float)
    p_click = np.array([t["p_click"] for t in truth.values()])
    assert max(clicks.values()) == 1
    # Bernoulli sum with known p: the standard error of the mean is sqrt(sum p(1-p)) / n.
    se = math.sqrt(float((p_click * (1 - p_click)).sum())) / len(p_click)
    assert abs(clicked.mean() - p_click.mean()) < 4 * se


def test_empirical_conversion_and_ysl_among_clicks_match_truth(big_run: list[SimRecord]) -> None:
    truth, clicks, follows = labels(big_run)
    clicked = [i for i in truth if clicks[i]]
    assert len(clicked) > 800
    p_conv = np.array([truth[i]["p_conv"] for i in clicked])
    converted = np.array([follows[i] > 0 for i in clicked], dtype=float)
    se = math.sqrt(float((p_conv * (1 - p_conv)).sum())) / len(clicked)
    assert abs(converted.mean() - p_conv.mean()) < 4 * se
    ysl = np.array([follows[i] for i in clicked], dtype=float)
    exp_ysl = np.array([truth[i]["exp_ysl"] for i in clicked])
    assert abs(ysl.mean() - exp_ysl.mean()) < 4 * ysl.std() / math.sqrt(len(ysl))
    # Nobody follows on without clicking first.
    assert set(follows) <= set(clicks)


def test_higher_truth_means_more_clicks(big_run: list[SimRecord]) -> None:
    truth, clicks, _ = labels(big_run)
    ranked = sorted(truth, key=lambda i: truth[i]["p_click"])
    low, high = ranked[: len(ranked) // 4], ranked[-len(ranked) // 4 :]
    assert sum(clicks[i] for i in high) > 2 * sum(clicks[i] for i in low)


def score_correlation(rho: float) -> float:
    world = World(dataclasses.replace(SMALL, rho=rho))
    rng = np.random.default_rng(0)
    click_logit, conv_logit = [], []
    for _ in range(1500):
        truth = world.truth(f"u{rng.integers(300)}", f"i{rng.integers(400)}", world.now_ms)
        click_logit.append(math.log(truth.p_click / (1 - truth.p_click)))
        conv_logit.append(math.log(truth.p_conv / (1 - truth.p_conv)))
    return float(np.corrcoef(click_logit, conv_logit)[0, 1])


def test_rho_sets_the_click_conversion_correlation() -> None:
    independent, half, same = (score_correlation(rho) for rho in (0.0, 0.5, 1.0))
    assert abs(independent) < 0.1
    assert independent + 0.2 < half < same - 0.2
    assert same > 0.7  # popularity, activity and price keep it below 1


def test_a_better_ranker_gets_more_clicks() -> None:
    """The closed-loop hook: ranking by true p_click beats the default random order."""
    config = SimConfig(world=SMALL, max_impressions=6000, duration_s=None)
    world = World(SMALL)

    def oracle(request: Request) -> list[str]:
        p = {i: world.truth(request.user_id, i, request.ts).p_click for i in request.candidate_ids}
        return sorted(p, key=p.__getitem__, reverse=True)

    random_clicks = len(by_topic(list(generate(config)))["clicks"])
    oracle_clicks = len(by_topic(list(generate(config, oracle, world)))["clicks"])
    assert oracle_clicks > 1.3 * random_clicks


# --- drift, cold start, delays -------------------------------------------------------------


def test_popularity_drifts_but_keeps_its_spread() -> None:
    world = World(SMALL)
    before = world.popularity()
    world.advance(SMALL.start_ms + 24 * HOUR_MS)
    after = world.popularity()[: len(before)]
    assert not np.allclose(before, after)
    # pop_tau_h = 24 h: after one tau the correlation is about exp(-1).
    assert 0.2 < np.corrcoef(before, after)[0, 1] < 0.6
    assert abs(after.std() / SMALL.pop_std - 1) < 0.2


def test_preferences_rotate_only_when_asked() -> None:
    still = dataclasses.replace(SMALL, pop_std=0.0, new_items_per_h=0.0, rotation_deg_per_h=0.0)
    moving = dataclasses.replace(still, rotation_deg_per_h=3.0)
    later = SMALL.start_ms + 24 * HOUR_MS
    for config, changes in ((still, False), (moving, True)):
        world = World(config)
        now = [world.truth(f"u{u}", "i5", world.now_ms).p_click for u in range(50)]
        then = [world.truth(f"u{u}", "i5", later).p_click for u in range(50)]
        assert (not np.allclose(now, then)) is changes


def test_new_items_appear_and_get_shown() -> None:
    world = World(dataclasses.replace(SMALL, new_items_per_h=120.0))
    world.advance(SMALL.start_ms + 2 * HOUR_MS)
    added = world.n_items - SMALL.n_items
    assert abs(added - 240) < 4 * math.sqrt(240)  # Poisson(120 per hour x 2 hours)
    assert (world.item_created_ms()[SMALL.n_items :] > SMALL.start_ms).all()

    config = SimConfig(
        world=dataclasses.replace(SMALL, new_items_per_h=600.0),
        duration_s=1800.0,
        target_eps=10.0,
        speedup=1.0,
    )
    shown = by_topic(list(generate(config)))["impressions"]
    new = [i for i in shown if int(i["item_id"][1:]) >= SMALL.n_items]
    assert new and all(i["features"]["item_age_h"] < 1.0 for i in new)


def test_late_events_beyond_the_window_at_the_configured_rates() -> None:
    # A click-happy world, so that a few thousand impressions give thousands of delays.
    world = dataclasses.replace(
        SMALL, click_bias=3.0, conv_bias=2.0, late_click_rate=0.04, late_follow_rate=0.08
    )
    topics = by_topic(records_of(world, 5000))
    window = int(world.window_s * 1000)
    imp_ts = {i["impression_id"]: i["ts"] for i in topics["impressions"]}
    click_ts = {c["impression_id"]: c["ts"] for c in topics["clicks"]}
    click_delays = np.array([ts - imp_ts[i] for i, ts in click_ts.items()])
    follow_delays = np.array(
        [f["ts"] - click_ts[f["impression_id"]] for f in topics["follow_clicks"]]
    )
    assert (click_delays > 0).all() and (follow_delays > 0).all()
    for delays, rate in ((click_delays, 0.04), (follow_delays, 0.08)):
        late = float((delays > window).mean())
        assert abs(late - rate) < 4 * math.sqrt(rate * (1 - rate) / len(delays))
        # On-time delays are mostly seconds to minutes.
        assert 5_000 < np.median(delays) < 300_000


def test_no_late_events_when_the_rates_are_zero() -> None:
    world = dataclasses.replace(SMALL, click_bias=3.0, late_click_rate=0.0, late_follow_rate=0.0)
    topics = by_topic(records_of(world, 1000))
    imp_ts = {i["impression_id"]: i["ts"] for i in topics["impressions"]}
    window = int(world.window_s * 1000)
    assert all(c["ts"] - imp_ts[c["impression_id"]] <= window for c in topics["clicks"])


# --- world API edges ---------------------------------------------------------------------


def test_time_only_moves_forward() -> None:
    world = World(SMALL)
    world.advance(SMALL.start_ms + 1000)
    with pytest.raises(ValueError, match="forward"):
        world.sample_request(SMALL.start_ms)


def test_popularity_ranking_orders_by_popularity() -> None:
    world = World(dataclasses.replace(SMALL, ranking="popularity"))
    request = world.sample_request(world.now_ms)
    shown = world.default_ranking(request)
    pop = world.popularity()
    assert len(shown) == SMALL.shown_per_request and set(shown) <= set(request.candidate_ids)
    assert [pop[int(i[1:])] for i in shown] == sorted(
        (pop[c] for c in request.candidates), reverse=True
    )[: SMALL.shown_per_request]


def test_outcome_rejects_unknown_items() -> None:
    world = World(SMALL)
    request = world.sample_request(world.now_ms)
    with pytest.raises(ValueError, match="unknown id"):
        world.outcome(request, ["i999999"])
    with pytest.raises(ValueError, match="prefix"):
        world.outcome(request, ["x1"])


@pytest.mark.parametrize(
    "changes", [{"rho": 1.5}, {"n_candidates": 5, "shown_per_request": 6}, {"late_click_rate": 1.0}]
)
def test_world_config_rejects_bad_values(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="invalid WorldConfig"):
        dataclasses.replace(SMALL, **changes)


def test_sim_config_from_flat_settings() -> None:
    config = SimConfig.from_dict(
        {"seed": 5, "rho": 0.9, "max_impressions": 10, "log_file": "x.jsonl"}
    )
    assert (config.world.seed, config.world.rho, config.max_impressions) == (5, 0.9, 10)
    assert config.log_file == Path("x.jsonl")
    with pytest.raises(ValueError, match="unknown simulator settings"):
        SimConfig.from_dict({"rh0": 0.5})
    with pytest.raises(ValueError, match="invalid SimConfig"):
        SimConfig(dup_rate=2.0)


# --- files -------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_run_writes_logs_that_read_back(tmp_path: Path, suffix: str) -> None:
    config = SimConfig(
        world=SMALL,
        max_impressions=500,
        duration_s=None,
        log_file=tmp_path / f"events{suffix}",
        truth_file=tmp_path / f"truth{suffix}",
    )
    stats = run(config)
    expected = list(generate(config))
    events = [r for r in expected if r[0] != "sim_truth"]
    assert list(read_log(tmp_path / f"events{suffix}")) == events
    assert list(read_truth(tmp_path / f"truth{suffix}")) == [
        v for t, _, v in expected if t == "sim_truth"
    ]
    assert stats.records["impressions"] == 500 == stats.records["sim_truth"]


def test_write_log_round_trips_and_read_log_rejects_other_json(tmp_path: Path) -> None:
    records = records_of(SMALL, 100)
    path = tmp_path / "log.jsonl"
    assert write_log(records, path) == len(records)
    assert list(read_log(path)) == records
    path.write_bytes(b'{"ts": 1}\n')
    with pytest.raises(ValueError, match="not an event log line"):
        list(read_log(path))


# --- Kafka path without Kafka ------------------------------------------------------------


class FakeFuture:
    def add_errback(self, callback: Any) -> FakeFuture:
        return self


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None]] = []
        self.flushed = self.closed = False

    def send(self, topic: str, value: bytes | None = None, key: bytes | None = None) -> FakeFuture:
        self.sent.append((topic, key, value))
        return FakeFuture()

    def flush(self, timeout: float | None = None) -> None:
        self.flushed = True

    def close(self, timeout: float | None = None) -> None:
        self.closed = True


def test_produce_sends_keyed_json_to_the_configured_topics() -> None:
    config = SimConfig(
        world=SMALL,
        max_impressions=300,
        duration_s=None,
        pacing="none",
        impressions_topic="t-imp",
        clicks_topic="t-click",
        follow_clicks_topic="t-follow",
    )
    producer = FakeProducer()
    stats = produce(config, producer=producer)
    expected = [r for r in generate(config) if r[0] != "sim_truth"]
    assert [(t, k.decode(), orjson.loads(v)) for t, k, v in producer.sent if k and v] == expected
    assert {t for t, _, _ in producer.sent} == {"t-imp", "t-click", "t-follow"}
    assert producer.flushed and not producer.closed  # the caller's producer stays open
    assert stats.records["t-imp"] == 300 and stats.duplicates == 0 and not stats.bad


def test_produce_can_send_truth_too() -> None:
    config = SimConfig(
        world=SMALL, max_impressions=50, duration_s=None, pacing="none", produce_truth=True
    )
    producer = FakeProducer()
    produce(config, producer=producer)
    assert sum(t == "sim_truth" for t, _, _ in producer.sent) == 50


def clean_stream(n: int) -> Iterator[SimRecord]:
    for i in range(n):
        yield "clicks", f"imp{i}", {"impression_id": f"imp{i}", "ts": 1000 + i, "click_id": f"c{i}"}
        yield "sim_truth", f"imp{i}", {"impression_id": f"imp{i}", "ts": 1000 + i, "p_click": 0.1}


def test_inject_faults_adds_duplicates_and_malformed_copies_at_the_rates() -> None:
    stats = SimStats()
    wire = list(inject_faults(clean_stream(4000), ["clicks"], 0.1, 0.05, seed=3, stats=stats))
    clicks = [(k, v) for t, k, v in wire if t == "clicks"]
    assert sum(t == "sim_truth" for t, _, _ in wire) == 4000  # truth is never salted
    assert abs(stats.duplicates - 400) < 4 * math.sqrt(400 * 0.9)
    assert abs(sum(stats.bad.values()) - 200) < 4 * math.sqrt(200 * 0.95)
    assert set(stats.bad) == set(BAD_REASONS)
    parsed: Counter[str] = Counter()
    for key, raw in clicks:
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            parsed["invalid_json"] += 1
            continue
        if "ts" not in value:
            parsed["missing_field"] += 1
        elif not isinstance(value["ts"], int):
            parsed["wrong_type"] += 1
        else:
            assert key == value["impression_id"].encode()
            parsed["ok"] += 1
    assert parsed["ok"] == 4000 + stats.duplicates
    assert all(parsed[reason] == stats.bad[reason] for reason in BAD_REASONS)


def test_run_with_a_producer_salts_only_kafka_not_the_log(tmp_path: Path) -> None:
    config = SimConfig(
        world=SMALL,
        max_impressions=400,
        duration_s=None,
        pacing="none",
        dup_rate=0.2,
        bad_rate=0.1,
        log_file=tmp_path / "events.jsonl",
    )
    producer = FakeProducer()
    stats = run(config, producer=producer)
    clean = sum(stats.records.values())
    assert len(producer.sent) == clean + stats.duplicates + sum(stats.bad.values())
    assert stats.duplicates > 0 and sum(stats.bad.values()) > 0
    assert len(list(read_log(tmp_path / "events.jsonl"))) == clean


# --- pacing ------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps = 0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds


def test_sim_pacing_follows_event_time_divided_by_speedup() -> None:
    clock = FakeClock()
    pacer = Pacer("sim", speedup=10.0, target_eps=1.0, clock=clock, sleep=clock.sleep)
    for ts in range(0, 20_001, 100):  # 20 simulated seconds
        pacer.wait(5_000_000 + ts)
    assert clock.now - 100.0 == pytest.approx(2.0, abs=0.01)


def test_wall_pacing_holds_the_rate_and_none_never_sleeps() -> None:
    clock = FakeClock()
    pacer = Pacer("wall", speedup=1.0, target_eps=2000.0, clock=clock, sleep=clock.sleep)
    for _ in range(1001):
        pacer.wait(0)  # event time is ignored
    assert clock.now - 100.0 == pytest.approx(0.5, abs=0.01)
    # Per-event sleeps below min_sleep_s are skipped: far fewer sleeps than events.
    assert clock.sleeps < 1000
    idle = FakeClock()
    free = Pacer("none", speedup=1.0, target_eps=1.0, clock=idle, sleep=idle.sleep)
    for ts in range(0, 10_000_000, 1000):
        free.wait(ts)
    assert idle.sleeps == 0
    with pytest.raises(ValueError, match="bad pace"):
        Pacer("sim", speedup=0.0, target_eps=1.0)
