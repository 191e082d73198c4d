"""The monitor's joins and counters, without Kafka or a scorer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from demo.metrics import soft_auc
from demo.monitor import JsonlTail, OracleJoin, ServedStats, SwapLog
from learner.metrics import ProgressiveValidation


def test_jsonl_tail_returns_whole_new_lines_only(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    tail = JsonlTail(path)
    assert tail.read() == []  # no file yet
    with path.open("wb") as f:
        f.write(b'{"a": 1}\n{"a": 2}\n{"a": ')
        f.flush()
        assert tail.read() == [{"a": 1}, {"a": 2}]
        assert tail.read() == []  # the partial line waits for its end
        f.write(b'3}\nnot json\n[1, 2]\n\n{"a": 4}\n')
    assert tail.read() == [{"a": 3}, {"a": 4}]
    assert tail.bad == 2


def sample(imp: str, click: int, conv: int, ysl: int, emitted: int, revision: int = 0) -> Any:
    sample_id = imp if revision == 0 else f"{imp}#{revision}"
    return {
        "sample_id": sample_id,
        "revision": revision,
        "labels": {"click": click, "conversion": conv, "ysl": ysl},
        "masks": {"ctr": 1, "cvr": click, "ctcvr": 1, "ysl": click},
        "emitted_at": emitted,
    }


def truth(imp: str, p_click: float, p_conv: float, exp_ysl: float) -> Any:
    return {
        "impression_id": imp,
        "p_click": p_click,
        "p_conv": p_conv,
        "p_ctcvr": p_click * p_conv,
        "exp_ysl": exp_ysl,
    }


def test_oracle_scores_the_truth_like_progressive_validation() -> None:
    rng = np.random.default_rng(0)
    n = 400
    p_click, p_conv, exp_ysl = rng.random(n), rng.random(n), 3 * rng.random(n)
    click = (rng.random(n) < p_click).astype(int)
    conv = click * (rng.random(n) < p_conv).astype(int)
    ysl = conv * rng.integers(1, 4, n)
    join = OracleJoin(window=100)
    join.add_truth(truth(f"i{k}", p_click[k], p_conv[k], exp_ysl[k]) for k in range(n))
    # samples arrive in two calls, in another order than the truth
    order = rng.permutation(n)
    batches = [order[: n // 2], order[n // 2 :]]
    for part in batches:
        join.add_samples(
            sample(f"i{k}", int(click[k]), int(conv[k]), int(ysl[k]), 1000 + k) for k in part
        )
    reference = ProgressiveValidation(
        {"ctr": "binary", "cvr": "binary", "ctcvr": "binary", "ysl": "count"}, window=100
    )
    for part in batches:
        reference.update(
            {"ctr": p_click[part], "cvr": p_conv[part], "ctcvr": (p_click * p_conv)[part],
             "ysl": exp_ysl[part]},
            {"ctr": click[part], "cvr": conv[part], "ctcvr": conv[part], "ysl": ysl[part]},
            {"ctr": np.ones(len(part)), "cvr": click[part], "ctcvr": np.ones(len(part)),
             "ysl": click[part]},
        )  # fmt: skip
    got, want = join.metrics.get(), reference.get()
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, nan_ok=True), key
    assert join.metrics.get()["ctr.auc"] > 0.6  # the truth predicts its own draws
    assert join.samples == join.matched == n and join.unmatched == 0
    assert sorted(join.emitted_ms) == list(range(1000, 1000 + n))


def test_oracle_waits_for_late_truth_then_gives_up() -> None:
    join = OracleJoin(window=10, max_wait=3)
    join.add_samples([sample("a", 1, 0, 0, 1), sample("b", 0, 0, 0, 2), sample("c", 1, 1, 2, 3, 1)])
    assert join.matched == 0 and len(join.pending) == 3
    join.add_truth([truth("a", 0.5, 0.5, 1.0), truth("c", 0.7, 0.4, 1.5)])  # c's revision 1
    join.add_samples([])
    assert join.matched == 2 and len(join.pending) == 1
    join.add_samples([])
    join.add_samples([])
    assert join.unmatched == 1 and not join.pending
    assert join.samples == 3 and len(join.emitted_ms) == 3


def test_oracle_truth_memory_is_bounded() -> None:
    join = OracleJoin(window=10, max_truth=5)
    join.add_truth(truth(f"i{k}", 0.1, 0.1, 0.1) for k in range(8))
    assert sorted(join.truth) == ["i3", "i4", "i5", "i6", "i7"]


def served(
    version: int | None, scores: list[float | None] | None, p: list[float], **extra: Any
) -> Any:
    return {
        "model_version": version,
        "scores": scores,
        "p_click": p,
        "latency_ms": 2.0,
        "fallback": None if scores is not None else "no_model",
        **extra,
    }


def test_served_stats_count_fallbacks_and_rank_against_the_truth() -> None:
    stats = ServedStats(window=2)
    p = [0.9, 0.5, 0.1]
    stats.add(
        [
            served(None, None, p),
            served(None, None, p, fallback="ConnectError"),
            served(1, [0.1, 0.5, 0.9], p),  # reversed: the worst ranking
            served(2, [0.9, 0.5, 0.1], p),
            served(2, [0.8, 0.6, 0.2], p),
            served(3, [0.3, None, 0.1], p),  # incomplete scores: not a model-served request
        ]
    )
    assert stats.requests == 6
    assert dict(stats.fallbacks) == {"no_model": 1, "ConnectError": 1, "error": 1}
    assert dict(stats.by_version) == {1: 1, 2: 2}
    assert stats.auc_recent == pytest.approx(soft_auc(p, p))  # the last two: perfect order
    assert stats.total.auc == pytest.approx((2 * soft_auc(p, p) + soft_auc(p[::-1], p)) / 3)


def test_swap_log_merges_successive_answers_in_serving_order() -> None:
    log = SwapLog()
    log.add([{"version": 1, "loaded_at": 100, "trained_through_ms": 50}])
    log.add(
        [
            {"version": 1, "loaded_at": 100, "trained_through_ms": 50},
            {"version": 3, "loaded_at": 300, "trained_through_ms": 250},
            {"version": "x", "loaded_at": 1},  # malformed: skipped
        ]
    )
    log.add([{"version": 2, "loaded_at": 400, "trained_through_ms": 120}])  # a rollback
    assert [s.version for s in log.all()] == [1, 3, 2]
    assert log.versions == [1, 3, 2]
    assert [s.trained_through_ms for s in log.all()] == [50, 250, 120]


def test_served_stats_read_the_loop_log_format(tmp_path: Path) -> None:
    path = tmp_path / "served.jsonl"
    record = served(4, [0.2, 0.1], [0.3, 0.2], items=["i1", "i2"])
    path.write_bytes(orjson.dumps(record) + b"\n")
    stats = ServedStats()
    stats.add(JsonlTail(path).read())
    assert stats.by_version[4] == 1 and stats.auc_recent > 0.5
