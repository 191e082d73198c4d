"""A synthetic recommendation world with known ground truth, for the traffic simulator.

Users and items carry latent vectors; a click depends on user/item affinity, item popularity
and position bias; a post-click follow-on (conversion) and the follow-on count (YSL) depend on
a second score whose correlation with the click score is ``rho``. Item popularity drifts, user
preferences rotate slowly and new items appear, all as a deterministic function of the seed and
of simulated time. Nothing here talks to Kafka: the world turns a request and a ranking into
plain event dicts (DESIGN.md section 2) with event-time timestamps.

Examples
--------
>>> world = World(WorldConfig(seed=1, n_users=50, n_items=80))
>>> request = world.sample_request(world.now_ms)
>>> shown = world.default_ranking(request)
>>> events = world.outcome(request, shown)
>>> sorted({event.kind for event in events} - {CLICK, FOLLOW_CLICK})
['impression', 'truth']
"""

from __future__ import annotations

import heapq
import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from feature_store.counters import CounterSettings, smoothed_ctr

logger = logging.getLogger(__name__)

__all__ = [
    "CLICK",
    "FOLLOW_CLICK",
    "IMPRESSION",
    "TRUTH",
    "Request",
    "SimEvent",
    "Truth",
    "World",
    "WorldConfig",
    "item_key",
    "user_key",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

IMPRESSION: Final = "impression"
CLICK: Final = "click"
FOLLOW_CLICK: Final = "follow_click"
TRUTH: Final = "truth"
EventKind = Literal["impression", "click", "follow_click", "truth"]

HOUR_MS = 3_600_000
# 2024-01-01T00:00:00Z: a fixed default so that the same seed gives the same timestamps.
DEFAULT_START_MS = 1_704_067_200_000
# Share of a latent vector that comes from its segment/category centroid: makes the
# categorical features informative without making them sufficient.
_CENTROID_WEIGHT = 0.6
# Bounds the YSL rate exponent so a rare extreme affinity cannot produce absurd counts.
_MAX_YSL_EXPONENT = 4.0


@dataclass(frozen=True)
class WorldConfig:
    """Parameters of the synthetic world; times are simulated time."""

    seed: int = 0  # drives every random draw: same seed, same world and same events
    start_ms: int = DEFAULT_START_MS  # simulated clock start, epoch ms
    run_id: str = ""  # prefix of request/impression ids; "" -> "s{seed}-{start_ms}"
    n_users: int = 5_000  # users (fixed population)
    n_items: int = 2_000  # items at start (more arrive, see new_items_per_h)
    k: int = 16  # latent dimension
    n_segments: int = 8  # user segments, feature "user_segment" = "s{n}"
    n_categories: int = 20  # item categories, feature "item_category" = "c{n}"
    rho: float = 0.5  # correlation of click and conversion scores: 1 same score, 0 independent
    click_bias: float = -2.0  # click logit intercept
    click_scale: float = 1.0  # weight of the user/item affinity in the click logit
    activity_effect: float = 0.2  # weight of log(user_activity) in the click logit
    position_bias: float = 0.7  # examination probability at 0-based position p: (1 + p)^-bias
    conv_bias: float = -0.8  # conversion (>= 1 follow-on | click) logit intercept
    conv_scale: float = 1.0  # weight of the conversion score in the conversion logit
    price_effect: float = -0.3  # weight of centred log(price) in the conversion logit
    ysl_rate: float = 0.8  # extra follow-ons beyond the first ~ Poisson(rate * exp(scale * s))
    ysl_scale: float = 0.5  # dependence of the extra follow-on rate on the conversion score
    pop_std: float = 0.5  # stationary std of item log-popularity (added to the click logit)
    pop_tau_h: float = 24.0  # popularity random walk mean-reversion time, hours
    rotation_deg_per_h: float = 1.0  # user preference rotation speed, degrees per hour
    drift_step_s: float = 60.0  # drift and new items advance on this simulated-time grid
    new_items_per_h: float = 20.0  # cold-start items appearing per simulated hour (Poisson)
    item_history_h: float = 720.0  # initial items were created up to this long before start
    n_candidates: int = 50  # candidate items per request
    shown_per_request: int = 10  # positions shown (top-N of the ranking)
    ranking: Literal["random", "popularity"] = "random"  # default ranking without a scorer
    click_delay_median_s: float = 20.0  # click delay after the impression: lognormal median
    click_delay_sigma: float = 1.2  # click delay lognormal sigma (of the log)
    follow_delay_median_s: float = 90.0  # follow-on delay after the click: lognormal median
    follow_delay_sigma: float = 1.0  # follow-on delay lognormal sigma
    window_s: float = 1800.0  # click and follow-on windows the on-time delays stay within
    late_click_rate: float = 0.01  # share of clicks landing after the click window
    late_follow_rate: float = 0.02  # share of follow-ons landing after the follow-on window
    late_extra_mean_s: float = 600.0  # how far past the window a late event lands: exponential

    def __post_init__(self) -> None:
        """Reject parameters the world cannot honour, naming every bad one."""
        checks = {
            "n_users >= 1": self.n_users >= 1,
            "n_items >= 1": self.n_items >= 1,
            "k >= 2": self.k >= 2,
            "n_segments >= 1": self.n_segments >= 1,
            "n_categories >= 1": self.n_categories >= 1,
            "0 <= rho <= 1": 0.0 <= self.rho <= 1.0,
            "pop_std >= 0": self.pop_std >= 0.0,
            "pop_tau_h > 0": self.pop_tau_h > 0.0,
            "drift_step_s > 0": self.drift_step_s > 0.0,
            "new_items_per_h >= 0": self.new_items_per_h >= 0.0,
            "item_history_h >= 0": self.item_history_h >= 0.0,
            "1 <= shown_per_request <= n_candidates": 1
            <= self.shown_per_request
            <= self.n_candidates,
            "n_candidates <= n_items": self.n_candidates <= self.n_items,
            "ranking in (random, popularity)": self.ranking in ("random", "popularity"),
            "delay medians > 0": min(self.click_delay_median_s, self.follow_delay_median_s) > 0,
            "delay sigmas >= 0": min(self.click_delay_sigma, self.follow_delay_sigma) >= 0,
            "window_s > delay medians": self.window_s
            > max(self.click_delay_median_s, self.follow_delay_median_s),
            "0 <= late rates < 1": min(self.late_click_rate, self.late_follow_rate) >= 0
            and max(self.late_click_rate, self.late_follow_rate) < 1,
            "late_extra_mean_s > 0": self.late_extra_mean_s > 0,
            "ysl_rate >= 0": self.ysl_rate >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid WorldConfig: {', '.join(bad)}")

    @property
    def id_prefix(self) -> str:
        """Prefix of request ids: ``run_id`` or one derived from seed and start."""
        return self.run_id or f"s{self.seed}-{self.start_ms}"


@dataclass(frozen=True)
class Truth:
    """True task probabilities of one (user, item, position) at one time.

    They describe behaviour, whenever it happens: a share ``late_click_rate`` of clicks (and
    ``late_follow_rate`` of follow-ons) lands after its window, where the join's labels miss it.
    """

    p_click: float  # P(click), position bias included
    p_conv: float  # P(>= 1 follow-on | click)
    exp_ysl: float  # E[number of follow-ons | click]

    @property
    def p_ctcvr(self) -> float:
        """P(click and >= 1 follow-on)."""
        return self.p_click * self.p_conv


@dataclass(frozen=True)
class Request:
    """One feed request: a user and the candidate items a ranker orders."""

    request_id: str
    user: int  # user index
    candidates: tuple[int, ...]  # item indices
    ts: int  # event time, epoch ms

    @property
    def user_id(self) -> str:
        """The user's public id."""
        return user_key(self.user)

    @property
    def candidate_ids(self) -> list[str]:
        """The candidates' public item ids, in sampling order."""
        return [item_key(i) for i in self.candidates]


@dataclass(frozen=True)
class SimEvent:
    """One record the world emits: its kind, event time and DESIGN.md section 2 fields."""

    kind: EventKind
    ts: int
    value: dict[str, Any]


@dataclass(frozen=True)
class _TruthArrays:
    p_click: FloatArray  # (N,)
    p_conv: FloatArray  # (N,)
    ysl_rate: FloatArray  # (N,) Poisson rate of follow-ons beyond the first

    @property
    def exp_ysl(self) -> FloatArray:
        return self.p_conv * (1.0 + self.ysl_rate)  # (N,)


def user_key(index: int) -> str:
    """Public id of user ``index``."""
    return f"u{index}"


def item_key(index: int) -> str:
    """Public id of item ``index``."""
    return f"i{index}"


def _parse_key(key: str, prefix: str, size: int) -> int:
    if not key.startswith(prefix) or not key[1:].isdigit():
        raise ValueError(f"not a simulated id with prefix {prefix!r}: {key!r}")
    index = int(key[1:])
    if index >= size:
        raise ValueError(f"unknown id {key!r}: the world has {size} of them")
    return index


def _sigmoid(x: FloatArray) -> FloatArray:
    return 1.0 / (1.0 + np.exp(-x))


def _mixed_latents(rng: np.random.Generator, groups: IntArray, centroids: FloatArray) -> FloatArray:
    """Latent vectors near their group centroid, unit variance per component."""
    noise = rng.standard_normal((len(groups), centroids.shape[1]))  # (N, k)
    return math.sqrt(_CENTROID_WEIGHT) * centroids[groups] + math.sqrt(1 - _CENTROID_WEIGHT) * noise


class _Catalog:
    """Item attributes; grows as new items appear (index = item id)."""

    def __init__(self, cfg: WorldConfig, rng: np.random.Generator) -> None:
        self.cat_centroids = rng.standard_normal((cfg.n_categories, cfg.k))  # (C, k)
        self.cat_centroids2 = rng.standard_normal((cfg.n_categories, cfg.k))  # (C, k)
        self.cat_log_price = rng.normal(3.0, 0.7, cfg.n_categories)  # (C,)
        self.mean_log_price = float(self.cat_log_price.mean())
        self.pop_std = cfg.pop_std
        self.category: IntArray = np.zeros(0, dtype=np.int64)
        self.latent: FloatArray = np.zeros((0, cfg.k))  # click direction (I, k)
        self.latent2: FloatArray = np.zeros((0, cfg.k))  # conversion-only direction (I, k)
        self.log_price: FloatArray = np.zeros(0)
        self.created_ms: IntArray = np.zeros(0, dtype=np.int64)
        self.pop: FloatArray = np.zeros(0)  # log-popularity, drifts
        history_ms = int(cfg.item_history_h * HOUR_MS)
        created = cfg.start_ms - rng.integers(0, history_ms + 1, cfg.n_items)
        self.add(rng, created.astype(np.int64))

    def __len__(self) -> int:
        return len(self.category)

    def add(self, rng: np.random.Generator, created_ms: IntArray) -> None:
        n = len(created_ms)
        category = rng.integers(0, len(self.cat_centroids), n).astype(np.int64)
        self.category = np.concatenate([self.category, category])
        self.latent = np.concatenate(
            [self.latent, _mixed_latents(rng, category, self.cat_centroids)]
        )
        self.latent2 = np.concatenate(
            [self.latent2, _mixed_latents(rng, category, self.cat_centroids2)]
        )
        log_price = self.cat_log_price[category] + rng.normal(0.0, 0.4, n)
        self.log_price = np.concatenate([self.log_price, log_price])
        self.created_ms = np.concatenate([self.created_ms, created_ms])
        # New items start from the stationary popularity law: cold, not necessarily unpopular.
        self.pop = np.concatenate([self.pop, rng.normal(0.0, self.pop_std, n)])


class _Population:
    """User attributes (fixed population)."""

    def __init__(self, cfg: WorldConfig, rng: np.random.Generator) -> None:
        centroids = rng.standard_normal((cfg.n_segments, cfg.k))  # (S, k)
        centroids2 = rng.standard_normal((cfg.n_segments, cfg.k))  # (S, k)
        self.segment: IntArray = rng.integers(0, cfg.n_segments, cfg.n_users).astype(np.int64)
        self.latent = _mixed_latents(rng, self.segment, centroids)  # (U, k)
        self.latent2 = _mixed_latents(rng, self.segment, centroids2)  # (U, k)
        self.activity: FloatArray = rng.lognormal(0.0, 0.8, cfg.n_users)  # (U,)
        # Active users send more requests: sample users in proportion to activity.
        self.cdf: FloatArray = np.cumsum(self.activity)

    def sample(self, rng: np.random.Generator) -> int:
        return int(np.searchsorted(self.cdf, rng.random() * self.cdf[-1], side="right"))


_COUNTER_SETTINGS = CounterSettings()


class _HourCounter:
    """Per-item impressions and clicks over the last hour of event time (item_ctr_1h)."""

    def __init__(self) -> None:
        self._imps: dict[int, deque[int]] = {}
        self._clicks: dict[int, deque[int]] = {}
        self._pending: list[tuple[int, int]] = []  # heap of (ts, item): clicks still ahead
        self._next_sweep = 0

    def add(self, item: int, imp_ts: int, click_ts: int | None) -> None:
        self._imps.setdefault(item, deque()).append(imp_ts)
        if click_ts is not None:
            heapq.heappush(self._pending, (click_ts, item))

    def advance(self, now_ms: int) -> None:
        # Only clicks whose event time has passed are visible to a live counter.
        while self._pending and self._pending[0][0] <= now_ms:
            ts, item = heapq.heappop(self._pending)
            self._clicks.setdefault(item, deque()).append(ts)
        if now_ms >= self._next_sweep:
            # Items that are not shown again are never trimmed by ctr(): sweep hourly so
            # memory stays bounded by one hour of traffic.
            for item in list(self._imps):
                self.ctr(item, now_ms)
            self._next_sweep = now_ms + HOUR_MS

    def ctr(self, item: int, now_ms: int) -> float | None:
        # The same smoothed ratio the stream's live counters write to Redis (and the scorer
        # reads), so an impression logs the value a closed-loop scorer saw, not a raw ratio.
        horizon = now_ms - HOUR_MS
        imps = _trim(self._imps, item, horizon)
        clicks = _trim(self._clicks, item, horizon)
        return None if imps == 0 else smoothed_ctr(imps, clicks, _COUNTER_SETTINGS)


def _trim(counts: dict[int, deque[int]], item: int, horizon: int) -> int:
    """Drop an item's timestamps at or before ``horizon``; return how many are left."""
    q = counts.get(item)
    if q is None:
        return 0
    while q and q[0] <= horizon:
        q.popleft()
    if not q:
        del counts[item]
    return len(q)


class World:
    """The simulated users, items and their behaviour over simulated time.

    Time only moves forward: every call with a time ``t`` first advances the drift to ``t``
    and raises ``ValueError`` for a ``t`` before the world's current time.

    Parameters
    ----------
    config
        The world's parameters.

    Examples
    --------
    >>> world = World(WorldConfig(seed=3, n_users=20, n_items=80))
    >>> truth = world.truth("u1", "i2", world.now_ms)
    >>> 0.0 <= truth.p_ctcvr <= truth.p_click <= 1.0
    True
    """

    def __init__(self, config: WorldConfig) -> None:
        self.config = config
        seeds = np.random.SeedSequence(config.seed).spawn(5)
        init_rng = np.random.default_rng(seeds[0])
        self._drift_rng = np.random.default_rng(seeds[1])
        self._request_rng = np.random.default_rng(seeds[2])
        self._outcome_rng = np.random.default_rng(seeds[3])
        self._estimate_seed = seeds[4]
        self.users = _Population(config, init_rng)
        self.items = _Catalog(config, init_rng)
        # Preferences rotate in k/2 random planes: u(t) = Q B(angle) Q^T u0.
        self._basis, _ = np.linalg.qr(init_rng.standard_normal((config.k, config.k)))  # (k, k)
        self._step = 0
        self._step_ms = max(1, round(config.drift_step_s * 1000))
        self._rotation: FloatArray = np.eye(config.k)  # (k, k)
        self._now = config.start_ms
        self._n_requests = 0
        self._counter = _HourCounter()
        # Position-bias examination probabilities, 0-based positions.
        self._examine = (1.0 + np.arange(config.n_candidates)) ** -config.position_bias

    @property
    def now_ms(self) -> int:
        """The world's current simulated time, epoch ms."""
        return self._now

    @property
    def n_items(self) -> int:
        """Items that exist now, new ones included."""
        return len(self.items)

    def popularity(self) -> FloatArray:
        """A copy of every item's current log-popularity, shape (n_items,)."""
        return self.items.pop.copy()

    def item_created_ms(self) -> IntArray:
        """A copy of every item's creation time, epoch ms, shape (n_items,)."""
        return self.items.created_ms.copy()

    def advance(self, t: int) -> None:
        """Move simulated time to ``t``: drift popularity, rotate preferences, add items."""
        if t < self._now:
            raise ValueError(f"time goes forward only: t={t} < now={self._now}")
        target = (t - self.config.start_ms) // self._step_ms
        while self._step < target:
            self._drift_one_step()
        self._now = t
        self._counter.advance(t)

    def _drift_one_step(self) -> None:
        cfg = self.config
        self._step += 1
        step_h = self._step_ms / HOUR_MS
        # Ornstein-Uhlenbeck random walk: drifts but keeps the stationary spread pop_std.
        decay = math.exp(-step_h / cfg.pop_tau_h)
        noise = self._drift_rng.standard_normal(len(self.items))
        self.items.pop = decay * self.items.pop + cfg.pop_std * math.sqrt(1 - decay**2) * noise
        n_new = int(self._drift_rng.poisson(cfg.new_items_per_h * step_h))
        if n_new:
            created = cfg.start_ms + self._step * self._step_ms
            self.items.add(self._drift_rng, np.full(n_new, created, dtype=np.int64))
        self._rotation = self._rotation_at(self._step * step_h)

    def _rotation_at(self, hours: float) -> FloatArray:
        angle = math.radians(self.config.rotation_deg_per_h * hours)
        c, s = math.cos(angle), math.sin(angle)
        block = np.eye(self.config.k)  # (k, k); odd k leaves the last axis fixed
        for i in range(0, self.config.k - 1, 2):
            block[i : i + 2, i : i + 2] = [[c, -s], [s, c]]
        rotation: FloatArray = self._basis @ block @ self._basis.T  # (k, k)
        return rotation

    def _truth_arrays(self, users: IntArray, items: IntArray, positions: IntArray) -> _TruthArrays:
        cfg = self.config
        scale = 1.0 / math.sqrt(cfg.k)
        u = self.users.latent[users] @ self._rotation.T  # (N, k)
        u2 = self.users.latent2[users] @ self._rotation.T  # (N, k)
        s_click = np.einsum("nk,nk->n", u, self.items.latent[items]) * scale  # (N,)
        s_other = np.einsum("nk,nk->n", u2, self.items.latent2[items]) * scale  # (N,)
        s_conv = cfg.rho * s_click + math.sqrt(1 - cfg.rho**2) * s_other  # (N,)
        click_logit = (
            cfg.click_bias
            + cfg.click_scale * s_click
            + self.items.pop[items]
            + cfg.activity_effect * np.log(self.users.activity[users])
        )
        conv_logit = (
            cfg.conv_bias
            + cfg.conv_scale * s_conv
            + cfg.price_effect * (self.items.log_price[items] - self.items.mean_log_price)
        )
        exponent = np.clip(cfg.ysl_scale * s_conv, -_MAX_YSL_EXPONENT, _MAX_YSL_EXPONENT)
        return _TruthArrays(
            p_click=self._examine[positions] * _sigmoid(click_logit),
            p_conv=_sigmoid(conv_logit),
            ysl_rate=cfg.ysl_rate * np.exp(exponent),
        )

    def truth(self, user_id: str, item_id: str, t: int, position: int = 0) -> Truth:
        """True probabilities for ``user_id`` seeing ``item_id`` at ``position`` at time ``t``."""
        self.advance(t)
        user = _parse_key(user_id, "u", self.config.n_users)
        item = _parse_key(item_id, "i", len(self.items))
        if not 0 <= position < len(self._examine):
            raise ValueError(f"position {position} outside [0, {len(self._examine)})")
        arrays = self._truth_arrays(
            np.array([user]), np.array([item]), np.array([position], dtype=np.int64)
        )
        return Truth(
            p_click=float(arrays.p_click[0]),
            p_conv=float(arrays.p_conv[0]),
            exp_ysl=float(arrays.exp_ysl[0]),
        )

    def truth_many(
        self, user_id: str, item_ids: Sequence[str], t: int, position: int = 0
    ) -> list[Truth]:
        """True probabilities of ``user_id`` seeing each of ``item_ids`` at one ``position``.

        The vectorised form of :meth:`truth`, for scoring a whole candidate list against the
        oracle (position 0 carries no position bias: the items' own relevance).

        Examples
        --------
        >>> world = World(WorldConfig(seed=3, n_users=20, n_items=80))
        >>> many = world.truth_many("u1", ["i2", "i5"], world.now_ms)
        >>> one = world.truth("u1", "i2", world.now_ms)
        >>> abs(many[0].p_click - one.p_click) < 1e-12, len(many)
        (True, 2)
        """
        self.advance(t)
        user = _parse_key(user_id, "u", self.config.n_users)
        items = np.array([_parse_key(i, "i", len(self.items)) for i in item_ids], dtype=np.int64)
        if not 0 <= position < len(self._examine):
            raise ValueError(f"position {position} outside [0, {len(self._examine)})")
        arrays = self._truth_arrays(
            np.full(len(items), user, dtype=np.int64),
            items,
            np.full(len(items), position, dtype=np.int64),
        )
        exp_ysl = arrays.exp_ysl
        return [
            Truth(float(arrays.p_click[j]), float(arrays.p_conv[j]), float(exp_ysl[j]))
            for j in range(len(items))
        ]

    def user_features(self, user: int) -> dict[str, Any]:
        """The stored (feature-store) features of user ``user``: segment and activity."""
        return {
            "user_segment": f"s{self.users.segment[user]}",
            "user_activity": round(float(self.users.activity[user]), 4),
        }

    def item_features(self, item: int) -> dict[str, Any]:
        """The stored features of item ``item`` now: category, price and age (no counters)."""
        return {
            "item_category": f"c{self.items.category[item]}",
            "item_price": round(math.exp(float(self.items.log_price[item])), 2),
            "item_age_h": round(max(0, self._now - int(self.items.created_ms[item])) / HOUR_MS, 3),
        }

    def sample_request(self, t: int) -> Request:
        """Draw the next request at time ``t``: a user (by activity) and candidate items."""
        self.advance(t)
        user = self.users.sample(self._request_rng)
        candidates = self._request_rng.choice(
            len(self.items), self.config.n_candidates, replace=False
        )
        self._n_requests += 1
        request_id = f"{self.config.id_prefix}-r{self._n_requests}"
        return Request(request_id, user, tuple(int(i) for i in candidates), t)

    def default_ranking(self, request: Request) -> list[str]:
        """Order a request's candidates without a scorer (random or by popularity), top-N ids."""
        candidates = np.asarray(request.candidates, dtype=np.int64)
        if self.config.ranking == "popularity":
            order = np.argsort(-self.items.pop[candidates], kind="stable")
        else:
            order = self._request_rng.permutation(len(candidates))
        return [item_key(int(i)) for i in candidates[order[: self.config.shown_per_request]]]

    def features(self, request: Request, item_ids: Sequence[str]) -> list[dict[str, Any]]:
        """The feature values (features.md names) a scorer sees for these items, now."""
        self.advance(max(self._now, request.ts))
        items = [_parse_key(i, "i", len(self.items)) for i in item_ids]
        return [self._item_features(request, item) for item in items]

    def _item_features(self, request: Request, item: int) -> dict[str, Any]:
        features: dict[str, Any] = {
            "user_id": request.user_id,
            "item_id": item_key(item),
            "user_segment": f"s{self.users.segment[request.user]}",
            "item_category": f"c{self.items.category[item]}",
            "user_activity": round(float(self.users.activity[request.user]), 4),
            "item_price": round(math.exp(float(self.items.log_price[item])), 2),
            "item_age_h": round(max(0, self._now - int(self.items.created_ms[item])) / HOUR_MS, 3),
        }
        ctr = self._counter.ctr(item, self._now)
        if ctr is not None:  # a live counter has nothing to say about an item unseen for an hour
            features["item_ctr_1h"] = round(ctr, 4)
        return features

    def outcome(
        self, request: Request, shown: Sequence[str], t: int | None = None
    ) -> list[SimEvent]:
        """Show ``shown`` (item ids, top first) at time ``t``; return what happens, unsorted.

        The list holds, per shown item, an impression (with its features) and a truth record
        at time ``t``, then its click and follow-on clicks, if any, at their own later times.
        """
        t = request.ts if t is None else t
        if len(shown) > len(self._examine):
            raise ValueError(f"{len(shown)} items shown, at most {len(self._examine)} positions")
        self.advance(t)
        items = np.array([_parse_key(i, "i", len(self.items)) for i in shown], dtype=np.int64)
        positions = np.arange(len(items), dtype=np.int64)
        users = np.full(len(items), request.user, dtype=np.int64)
        truth = self._truth_arrays(users, items, positions)
        # Features first: a scorer sees the counters before this slate's impressions count.
        features = [self._item_features(request, int(item)) for item in items]
        events: list[SimEvent] = []
        for pos, item in enumerate(items):
            events.extend(self._one_impression(request, int(item), pos, t, truth, features[pos]))
        return events

    def _one_impression(
        self,
        request: Request,
        item: int,
        pos: int,
        t: int,
        truth: _TruthArrays,
        features: dict[str, Any],
    ) -> list[SimEvent]:
        rng = self._outcome_rng
        imp_id = f"{request.request_id}-{pos}"
        p_click, p_conv = float(truth.p_click[pos]), float(truth.p_conv[pos])
        events = [
            SimEvent(
                IMPRESSION, t, self._impression_value(request, imp_id, item, pos, t, features)
            ),
            SimEvent(TRUTH, t, _truth_value(imp_id, t, p_click, p_conv, truth.exp_ysl[pos])),
        ]
        clicked = rng.random() < p_click
        click_ts = t + int(self._delays(1, clicked=True)[0]) if clicked else None
        self._counter.add(item, t, click_ts)
        if click_ts is None:
            return events
        events.append(SimEvent(CLICK, click_ts, _click_value(imp_id, click_ts)))
        n_follow = 0
        if rng.random() < p_conv:
            n_follow = 1 + int(rng.poisson(truth.ysl_rate[pos]))
        delays = np.sort(self._delays(n_follow, clicked=False))
        follow_items = rng.integers(0, len(self.items), n_follow)
        for j, (delay, follow_item) in enumerate(zip(delays, follow_items, strict=True)):
            ts = click_ts + int(delay)
            events.append(SimEvent(FOLLOW_CLICK, ts, _follow_value(imp_id, ts, j, follow_item)))
        return events

    def _impression_value(
        self,
        request: Request,
        imp_id: str,
        item: int,
        pos: int,
        t: int,
        features: dict[str, Any],
    ) -> dict[str, Any]:
        return {
            "impression_id": imp_id,
            "request_id": request.request_id,
            "user_id": request.user_id,
            "item_id": item_key(item),
            "ts": t,
            "position": pos,
            "features": features,
            "context": {"hour": (t // HOUR_MS) % 24, "slate_size": self.config.shown_per_request},
        }

    def _delays(self, n: int, *, clicked: bool) -> IntArray:
        """Click (``clicked``) or follow-on delays in ms: lognormal within the window, or late."""
        cfg = self.config
        if clicked:
            median, sigma, late_rate = (
                cfg.click_delay_median_s,
                cfg.click_delay_sigma,
                cfg.late_click_rate,
            )
        else:
            median, sigma, late_rate = (
                cfg.follow_delay_median_s,
                cfg.follow_delay_sigma,
                cfg.late_follow_rate,
            )
        rng = self._outcome_rng
        on_time = _truncated_lognormal(rng, n, median, sigma, cfg.window_s)  # (n,) seconds
        late = cfg.window_s + 0.001 + rng.exponential(cfg.late_extra_mean_s, n)  # (n,) seconds
        seconds = np.where(rng.random(n) < late_rate, late, on_time)
        ms: IntArray = np.maximum(1, np.ceil(seconds * 1000)).astype(np.int64)
        return ms

    def expected_events_per_impression(self, n_pairs: int = 4000) -> float:
        """Monte Carlo mean of (1 impression + clicks + follow-ons) per shown item, at now.

        Uses its own random stream, so calling it does not change the simulated traffic.
        """
        rng = np.random.default_rng(self._estimate_seed)
        users = np.array([self.users.sample(rng) for _ in range(n_pairs)], dtype=np.int64)
        items = rng.integers(0, len(self.items), n_pairs).astype(np.int64)
        positions = rng.integers(0, self.config.shown_per_request, n_pairs).astype(np.int64)
        truth = self._truth_arrays(users, items, positions)
        return float(np.mean(1.0 + truth.p_click * (1.0 + truth.exp_ysl)))


def _truncated_lognormal(
    rng: np.random.Generator, n: int, median: float, sigma: float, upper: float
) -> FloatArray:
    """Lognormal(log(median), sigma) draws conditioned on being <= ``upper`` (rejection)."""
    out = median * np.exp(sigma * rng.standard_normal(n))  # (n,)
    for _ in range(50):
        over = out > upper
        if not over.any():
            return out
        out[over] = median * np.exp(sigma * rng.standard_normal(int(over.sum())))
    # Only reachable with a median near the window: clamping a handful of draws is harmless.
    return np.minimum(out, upper)


def _truth_value(
    imp_id: str, ts: int, p_click: float, p_conv: float, exp_ysl: float
) -> dict[str, Any]:
    return {
        "impression_id": imp_id,
        "ts": ts,
        "p_click": p_click,
        "p_conv": p_conv,
        "p_ctcvr": p_click * p_conv,
        "exp_ysl": float(exp_ysl),
    }


def _click_value(imp_id: str, ts: int) -> dict[str, Any]:
    return {"impression_id": imp_id, "ts": ts, "click_id": f"{imp_id}-c"}


def _follow_value(imp_id: str, ts: int, j: int, follow_item: Any) -> dict[str, Any]:
    return {
        "impression_id": imp_id,
        "ts": ts,
        "follow_id": f"{imp_id}-f{j}",
        "item_id": item_key(int(follow_item)),
    }
