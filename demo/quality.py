"""Was the served ranking any good? Served scores against the oracle, a random ranking and a
frozen first snapshot, all on the same requests.

The measure is :func:`demo.metrics.grouped_soft_auc` of a request's candidate scores against
their true click probabilities (at position 0, i.e. without position bias), pooled over the pairs
of candidates within each request. The frozen baseline rescores the logged requests with the
first snapshot the scorer served, rebuilt from the registry with ``learner.models.load_model``
(through :func:`serving.swap.rebuild_model`), on the features the feature store holds at the end
of the run: the same features the scorer read when the item features did not change (live item
counters off), nearly the same otherwise.

Examples
--------
>>> records = [{"model_version": 2, "items": ["i1", "i2"], "scores": [0.9, 0.1],
...             "ctr": [0.5, 0.2], "p_click": [0.4, 0.1]}]
>>> report = evaluate(records)
>>> report.requests, round(report.served_auc, 3), round(report.oracle_auc, 3)
(1, 0.857, 0.857)

The oracle's own ranking (by the true probabilities) is the ceiling: with probabilities
rather than 0/1 labels, even a perfect ranking stays below 1.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from demo.metrics import grouped_soft_auc
from feature_store.registry import Snapshot
from feature_store.store import FieldRows
from serving.scorer import LoadedModel, feature_rows
from serving.swap import ModelBuilder

__all__ = ["FieldReader", "QualityReport", "evaluate", "frozen_model", "model_served", "rescore"]

logger = logging.getLogger(__name__)

Record = Mapping[str, Any]


class FieldReader(Protocol):
    """The part of :class:`feature_store.store.FeatureStore` rescoring uses."""

    def read_fields(
        self, user_id: str, item_ids: Sequence[str], fields: Sequence[str]
    ) -> FieldRows:
        """Read ``fields`` of a user and its candidates in one round trip."""
        ...


@dataclass(frozen=True)
class QualityReport:
    """Grouped soft AUC against true P(click) of each ranking, on the same requests."""

    requests: int  # requests compared: served by a model newer than the frozen one
    served_auc: float  # the fused scores the scorer served
    served_ctr_auc: float  # the served ctr predictions alone
    random_auc: float  # uniform random scores (seeded)
    oracle_auc: float  # the true probabilities themselves: the best any ranking can do
    frozen_version: int | None  # the frozen snapshot's version (None: no frozen baseline)
    frozen_auc: float
    frozen_ctr_auc: float

    def to_dict(self) -> dict[str, Any]:
        """JSON form (NaN stays NaN)."""
        return asdict(self)


def model_served(record: Record) -> bool:
    """Whether a served-log record was ranked by a model (complete scores), not a fallback."""
    scores = record.get("scores")
    return (
        record.get("model_version") is not None
        and scores is not None
        and not any(s is None for s in scores)
    )


def frozen_model(snapshot: Snapshot, weights: Mapping[str, float]) -> LoadedModel:
    """Rebuild a snapshot for scoring in this process (torch runtime, the scorer's fusion)."""
    return ModelBuilder(runtime="torch", weights=weights).build(snapshot)


def rescore(
    model: LoadedModel,
    store: FieldReader,
    records: Sequence[Record],
    weights: Mapping[str, float],
    chunk: int = 100,
) -> list[tuple[list[float], list[float]]]:
    """Fused scores and ctr predictions of ``model`` for each record's candidates.

    Features are read per request as the scorer reads them; scoring runs ``chunk`` requests
    at a time (one forward pass over all their candidates).
    """
    ctr = model.tasks.index("ctr") if "ctr" in model.tasks else None
    out: list[tuple[list[float], list[float]]] = []
    for start in range(0, len(records), chunk):
        rows: list[dict[str, Any]] = []
        sizes = []
        for record in records[start : start + chunk]:
            user_id, items = str(record["user_id"]), [str(i) for i in record["items"]]
            found = store.read_fields(user_id, items, model.fields)
            rows += feature_rows(model.fields, user_id, items, found)
            sizes.append(len(items))
        scored = model.score(rows, weights)
        preds = scored.preds[:, ctr] if ctr is not None else np.full(len(rows), np.nan)
        at = 0
        for n in sizes:
            out.append(
                (
                    [float(x) for x in scored.scores[at : at + n]],
                    [float(x) for x in preds[at : at + n]],
                )
            )
            at += n
    return out


def _auc(records: Sequence[Record], key: str) -> float:
    groups = [(r[key], r["p_click"]) for r in records if r.get(key) is not None]
    if any(any(v is None for v in scores) for scores, _ in groups):
        return math.nan
    return grouped_soft_auc(groups)


def evaluate(
    records: Iterable[Record],
    frozen: LoadedModel | None = None,
    store: FieldReader | None = None,
    weights: Mapping[str, float] | None = None,
    seed: int = 0,
) -> QualityReport:
    """Compare the served ranking with random and (given ``frozen`` and ``store``) frozen scores.

    Only requests served by a model newer than ``frozen`` count, so the frozen snapshot is
    never compared with itself.
    """
    after = -1 if frozen is None else frozen.version
    chosen = [r for r in records if model_served(r) and int(r["model_version"]) > after]
    rng = np.random.default_rng(seed)
    random_groups = [(rng.random(len(r["items"])), r["p_click"]) for r in chosen]
    frozen_auc = frozen_ctr_auc = math.nan
    if frozen is not None and store is not None and chosen:
        rescored = rescore(frozen, store, chosen, weights or {})
        frozen_auc = grouped_soft_auc(
            (scores, r["p_click"]) for (scores, _), r in zip(rescored, chosen, strict=True)
        )
        frozen_ctr_auc = grouped_soft_auc(
            (ctr, r["p_click"]) for (_, ctr), r in zip(rescored, chosen, strict=True)
        )
    return QualityReport(
        requests=len(chosen),
        served_auc=_auc(chosen, "scores"),
        served_ctr_auc=_auc(chosen, "ctr"),
        random_auc=grouped_soft_auc(random_groups),
        oracle_auc=grouped_soft_auc((r["p_click"], r["p_click"]) for r in chosen),
        frozen_version=None if frozen is None else frozen.version,
        frozen_auc=frozen_auc,
        frozen_ctr_auc=frozen_ctr_auc,
    )
