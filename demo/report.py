"""The end of a demo run: the summary table and the PNG plots.

Plots written into ``<out>/plots``:

- ``auc_vs_oracle.png``: per binary task, the learner's rolling progressive AUC over wall time
  next to the oracle's on the same samples, and the served ranking's AUC against true P(click);
- ``freshness.png``: the distribution of freshness, and freshness against emission time, with
  the publish interval marked;
- ``metrics_auc.png``, ``metrics_logloss.png``, ``metrics_mse.png``, ``experts.png``: the
  learner's own report (:func:`learner.report.write_report`) of its metrics history.

Examples
--------
>>> print(format_summary({"run_id": "r1", "out": "out/r1", "wall_s": 61.0}).splitlines()[0])
mtlstream demo summary: run r1, 61 s, output in out/r1
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from learner.report import write_report

__all__ = ["format_summary", "plot_auc_vs_oracle", "plot_freshness", "write_plots"]

logger = logging.getLogger(__name__)

Series = Sequence[Mapping[str, Any]]
_AUC_TASKS = ("ctr", "cvr", "ctcvr")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def _values(series: Series, group: str, task: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for point in series:
        value = (point.get(group) or {}).get(task)
        if isinstance(value, int | float) and math.isfinite(value):
            xs.append(float(point["t"]))
            ys.append(float(value))
    return xs, ys


def plot_auc_vs_oracle(series: Series, out_dir: Path) -> Path | None:
    """Rolling AUC of the model and of the oracle per task, and the served AUC, over time."""
    if not series:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(_AUC_TASKS) + 1, figsize=(16, 4), squeeze=False)
    for ax, task in zip(axes[0], _AUC_TASKS, strict=False):
        ax.plot(*_values(series, "model", task), color="C0", label="model (learner)")
        ax.plot(*_values(series, "oracle", task), color="C2", ls="--", label="oracle (truth)")
        ax.set_title(f"{task}: progressive AUC (window)", fontsize="small")
        ax.set_xlabel("wall s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    ax = axes[0][-1]
    ax.plot(*_values(series, "served", "auc"), color="C1", label="served ranking")
    ax.axhline(0.5, color="grey", ls=":", label="random")
    ax.set_title("served: AUC vs true P(click)", fontsize="small")
    ax.set_xlabel("wall s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = out_dir / "auc_vs_oracle.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_freshness(
    emitted_s: ArrayLike, fresh_s: ArrayLike, publish_every_s: float, out_dir: Path
) -> Path | None:
    """Histogram of freshness and freshness over emission time (both in seconds)."""
    emitted = np.asarray(emitted_s, dtype=np.float64)
    fresh = np.asarray(fresh_s, dtype=np.float64)
    keep = np.isfinite(fresh)
    if not keep.any():
        return None
    plt = _pyplot()
    fig, (hist, over) = plt.subplots(1, 2, figsize=(12, 4))
    hist.hist(fresh[keep], bins=40, color="C0")
    hist.axvline(
        publish_every_s, color="C3", ls="--", label=f"publish interval {publish_every_s:g} s"
    )
    hist.set_xlabel("freshness (s): sample emitted -> first served snapshot trained on it")
    hist.set_ylabel("samples")
    hist.legend(fontsize="small")
    over.plot(emitted[keep], fresh[keep], ".", ms=2, color="C0")
    over.axhline(publish_every_s, color="C3", ls="--")
    over.set_xlabel("sample emitted (wall s since start)")
    over.set_ylabel("freshness (s)")
    for ax in (hist, over):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / "freshness.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(
    out_dir: Path,
    series: Series,
    history: Sequence[dict[str, Any]],
    emitted_s: ArrayLike,
    fresh_s: ArrayLike,
    publish_every_s: float,
) -> list[Path]:
    """Write every plot the run has data for; return the files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [
        plot_auc_vs_oracle(series, out_dir),
        plot_freshness(emitted_s, fresh_s, publish_every_s, out_dir),
    ]
    files = [p for p in written if p is not None]
    if history:
        files += write_report(list(history), out_dir)
    return files


def _fmt(value: Any, spec: str = ".4f") -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int | float):
        return "-" if not math.isfinite(value) else f"{value:{spec}}"
    return str(value)


def _metric_lines(summary: Mapping[str, Any]) -> list[str]:
    rows = summary.get("metrics") or []
    if not rows:
        return []
    lines = [f"  {'task':<7}{'metric':<9}{'model':>9}{'oracle':>9}   (rolling window, end of run)"]
    for row in rows:
        lines.append(
            f"  {row['task']:<7}{row['metric']:<9}{_fmt(row['model']):>9}{_fmt(row['oracle']):>9}"
        )
    return lines


def format_summary(summary: Mapping[str, Any]) -> str:
    """The summary as a plain-text table (what the demo prints at the end)."""
    topics = summary.get("topics") or {}
    learner = summary.get("learner") or {}
    scorer = summary.get("scorer") or {}
    served = summary.get("served") or {}
    quality = summary.get("quality") or {}
    fresh = summary.get("freshness") or {}
    lines = [
        f"mtlstream demo summary: run {summary.get('run_id')}, "
        f"{_fmt(summary.get('wall_s'), '.0f')} s, output in {summary.get('out')}",
    ]
    if summary.get("stopped_by"):
        lines.append(
            f"  stopped by: {summary['stopped_by']}   exit code {summary.get('exit_code')}"
        )
    if topics:
        lines.append("  events: " + "  ".join(f"{k}={v:,}" for k, v in topics.items()))
    if learner:
        lines.append(
            f"  learner: samples={_fmt(learner.get('samples'), ',')} "
            f"steps={_fmt(learner.get('step'), ',')} "
            f"versions published={_fmt(learner.get('version'), ',')}"
        )
    lines += _metric_lines(summary)
    if scorer:
        lines.append(
            f"  scorer: versions served={len(scorer.get('versions') or [])} "
            f"latency p50={_fmt(scorer.get('latency_p50_ms'), '.2f')} ms "
            f"p99={_fmt(scorer.get('latency_p99_ms'), '.2f')} ms"
        )
    if served:
        lines.append(
            f"  served: requests={served.get('requests', 0):,} "
            f"fallbacks={served.get('fallbacks') or {}}"
        )
    if quality:
        lines.append(
            f"  ranking AUC vs true P(click) on {quality.get('requests', 0):,} requests: "
            f"served={_fmt(quality.get('served_auc'), '.4f')} "
            f"frozen v{quality.get('frozen_version')}={_fmt(quality.get('frozen_auc'), '.4f')} "
            f"random={_fmt(quality.get('random_auc'), '.4f')} "
            f"oracle={_fmt(quality.get('oracle_auc'), '.4f')}"
        )
    if fresh:
        lines.append(
            f"  freshness (s): median={_fmt(fresh.get('median_s'), '.2f')} "
            f"p95={_fmt(fresh.get('p95_s'), '.2f')} max={_fmt(fresh.get('max_s'), '.2f')} "
            f"over {fresh.get('n', 0):,} samples "
            f"(publish interval {_fmt(fresh.get('publish_every_s'), 'g')} s)"
        )
    for path in summary.get("plots") or []:
        lines.append(f"  plot: {path}")
    return "\n".join(lines)
