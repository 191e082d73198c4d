"""The simulator's world as a data set with ground truth: ESMM's sample-selection-bias test.

Impressions are drawn with `stream.simulate.generate` (the world's own ranking, no Kafka),
with the features the scorer would have seen, encoded by the learner's own `encode_rows` and
`default_feature_spec`. Labels: ctr = clicked, cvr = at least one follow-on click (its sample
space is the clicked impressions only), ctcvr = both. The test split also carries every
impression's true probabilities, so a cvr model can be scored over *all* impressions: the
space it is served on, which the clicked-only training data does not represent (ESMM,
Ma et al. 2018). Splits are chronological (train on the past, test on the future).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from evaluation.datasets import Dataset, Split
from evaluation.metrics import task_metrics, truth_metrics
from learner.features import default_feature_spec, encode_rows
from stream.simulate import SimConfig, generate
from stream.world import WorldConfig

__all__ = ["TASKS", "load_world"]

logger = logging.getLogger(__name__)

TASKS = {"ctr": "binary", "cvr": "binary", "ctcvr": "binary"}
_FRACTIONS = (0.8, 0.1, 0.1)


def _collect(
    config: SimConfig,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]], set[str], set[str]]:
    """Return impressions (event-time order), truth by impression, clicked and converted ids."""
    impressions: list[dict[str, Any]] = []
    truth: dict[str, dict[str, Any]] = {}
    clicked: set[str] = set()
    converted: set[str] = set()
    for topic, key, value in generate(config):
        if topic == config.impressions_topic:
            impressions.append(value)
        elif topic == config.truth_topic:
            truth[key] = value
        elif topic == config.clicks_topic:
            clicked.add(key)
        elif topic == config.follow_clicks_topic:
            converted.add(key)
    return impressions, truth, clicked, converted


def _split(
    cat: np.ndarray[Any, np.dtype[np.int64]],
    dense: np.ndarray[Any, np.dtype[np.float32]],
    labels: dict[str, np.ndarray[Any, np.dtype[np.float32]]],
    truth: dict[str, np.ndarray[Any, np.dtype[np.float64]]],
    rows: slice,
) -> Split:
    return Split(
        cat[rows],
        dense[rows],
        {t: y[rows] for t, y in labels.items()},
        masks={"cvr": labels["ctr"][rows]},  # cvr is observed on clicked impressions only
        truth={t: p[rows] for t, p in truth.items()},
    )


def _cuts(n: int, fractions: Sequence[float]) -> list[slice]:
    ends = np.round(np.cumsum(fractions) * n).astype(int)
    starts = np.concatenate([[0], ends[:-1]])
    return [slice(int(a), int(b)) for a, b in zip(starts, ends, strict=True)]


def load_world(seed: int, n_impressions: int = 300_000, rho: float = 0.5) -> Dataset:
    """Return `n_impressions` simulated impressions of world `seed`, split by time 80/10/10.

    Examples
    --------
    >>> data = load_world(seed=1, n_impressions=500)
    >>> len(data.train) + len(data.valid) + len(data.test), sorted(data.test.truth)
    (500, ['ctcvr', 'ctr', 'cvr'])
    """
    if n_impressions < 10:
        raise ValueError(f"n_impressions must be >= 10, got {n_impressions}")
    config = SimConfig(
        world=WorldConfig(seed=seed, rho=rho), duration_s=None, max_impressions=n_impressions
    )
    impressions, truth, clicked, converted = _collect(config)
    ids = [imp["impression_id"] for imp in impressions]
    spec = default_feature_spec()
    encoded = encode_rows(spec, [imp.get("features") or {} for imp in impressions])
    click = np.array([i in clicked for i in ids], dtype=np.float32)  # (N,)
    conv = np.array([i in converted for i in ids], dtype=np.float32)  # (N,) follow-ons need a click
    labels = {"ctr": click, "cvr": conv, "ctcvr": click * conv}
    p_click = np.array([truth[i]["p_click"] for i in ids])  # (N,)
    p_conv = np.array([truth[i]["p_conv"] for i in ids])  # (N,)
    oracle = {"ctr": p_click, "cvr": p_conv, "ctcvr": p_click * p_conv}
    train, valid, test = (
        _split(encoded.cat, encoded.dense, labels, oracle, rows)
        for rows in _cuts(len(ids), _FRACTIONS)
    )
    # the ceiling: the true probabilities themselves, scored like a model on the test split
    oracle_metrics = task_metrics(TASKS, test.truth, test) | truth_metrics(test.truth, test)
    ceiling = ", ".join(
        f"{name} {oracle_metrics[name]:.4f}" for name in ("ctr.auc", "cvr.auc", "cvr.auc_true")
    )
    logger.info(
        "world seed=%d impressions=%d clicks=%d conversions=%d",
        seed,
        len(ids),
        int(click.sum()),
        int(conv.sum()),
    )
    return Dataset(
        name=f"world/rho={rho:g}",
        tasks=dict(TASKS),
        spec=spec,
        train=train,
        valid=valid,
        test=test,
        note=(
            f"simulator world (seed = run seed, rho={rho:g}): {len(ids)} impressions, "
            f"{int(click.sum())} clicks, {int(conv.sum())} conversions; chronological "
            "80/10/10 split; cvr trained on clicked rows only, scored also over all "
            f"impressions against the true p_conv. The true probabilities score {ceiling}"
        ),
    )
