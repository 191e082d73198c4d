"""Results: mean ± std over seeds, MTL gain per task, markdown tables and PNG plots.

MTL gain (PLE paper): a model's test metric minus the single-task model's on the same data
(same data set, seed, target form and, when it was run, weighting), signed so that positive
is better: AUC - AUC_single for binary tasks, MSE_single - MSE for the others.

Examples
--------
>>> [round(x, 4) for x in mean_std([0.5, 0.7])]
[0.6, 0.1414]
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from evaluation.experiments import RunRecord

__all__ = [
    "Summary",
    "correlation_table",
    "format_stat",
    "mean_std",
    "mtl_gains",
    "plot_correlation",
    "plot_dataset",
    "results_markdown",
    "summarize",
]

# dataset -> variant -> metric -> values over seeds
Summary = dict[str, dict[str, dict[str, list[float]]]]
_HEADLINE = re.compile(r"^[a-z0-9_]+\.(auc|mse)$")
_CORRELATION = re.compile(r"^(?P<family>[^/]+)/p=(?P<p>[-0-9.]+)$")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Return the mean and sample standard deviation (0 for one value) of the finite values."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0
    return float(np.mean(finite)), std


def format_stat(values: Sequence[float], digits: int = 4) -> str:
    """Return ``"mean ± std"`` with `digits` decimals ("n/a" when nothing is finite).

    Examples
    --------
    >>> format_stat([0.9, 0.92])
    '0.9100 ± 0.0141'
    """
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _gain(metric: str, value: float, reference: float) -> float:
    return value - reference if metric.endswith(".auc") else reference - value


def mtl_gains(records: Sequence[RunRecord]) -> dict[tuple[str, str, int], dict[str, float]]:
    """Return {(dataset, variant, seed): {metric: gain}} for every record with a reference."""
    singles = {
        (r.dataset, r.seed, r.target, r.weighting): r
        for r in records
        if r.model == "single" and not r.esmm
    }
    gains: dict[tuple[str, str, int], dict[str, float]] = {}
    for r in records:
        if r.model == "single" and not r.esmm:
            continue
        ref = singles.get((r.dataset, r.seed, r.target, r.weighting)) or singles.get(
            (r.dataset, r.seed, r.target, "static")
        )
        if ref is None:
            continue
        gains[r.dataset, r.variant, r.seed] = {
            m: _gain(m, v, ref.metrics[m])
            for m, v in r.metrics.items()
            if _HEADLINE.match(m) and m in ref.metrics
        }
    return gains


def summarize(records: Iterable[RunRecord]) -> Summary:
    """Group every metric's values over seeds: dataset -> variant -> metric -> values."""
    out: Summary = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in records:
        cell = out[r.dataset][r.variant]
        for metric, value in r.metrics.items():
            cell[metric].append(value)
        cell["best_epoch"].append(float(r.best_epoch))
        cell["seconds"].append(r.seconds)
    return out


def _metric_title(metric: str) -> str:
    task, _, name = metric.partition(".")
    titles = {
        "auc": "AUC",
        "mse": "MSE",
        "auc_true": "AUC vs truth (all)",
        "mse_true": "MSE vs truth (all)",
        "bias": "bias vs truth (all)",
    }
    return f"{task} {titles.get(name, name)}"


def _dataset_table(
    dataset: str, records: Sequence[RunRecord], gains: dict[tuple[str, str, int], dict[str, float]]
) -> list[str]:
    rows = [r for r in records if r.dataset == dataset]
    metrics = list(dict.fromkeys(m for r in rows for m in r.metrics))
    headline = [m for m in metrics if _HEADLINE.match(m)]
    variants = list(dict.fromkeys(r.variant for r in rows))
    summary = summarize(rows)[dataset]
    header = ["model", *map(_metric_title, metrics)]
    header += [f"MTL gain {m.split('.')[0]}" for m in headline]
    header += ["best epoch", "s / run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v in variants:
        cells = [v, *(format_stat(summary[v][m]) for m in metrics)]
        for m in headline:
            values = [g[m] for (d, name, _), g in gains.items() if d == dataset and name == v]
            cells.append(format_stat(values) if values else "")
        cells.append(format_stat(summary[v]["best_epoch"], 1))
        cells.append(f"{mean_std(summary[v]['seconds'])[0]:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def correlation_table(records: Sequence[RunRecord]) -> list[str]:
    """Return a markdown table: variant x correlation, mean task MSE (mean ± std over seeds).

    Only data sets named "<family>/p=<correlation>" (the synthetic data) take part.
    """
    by_cell: dict[tuple[str, float], list[float]] = defaultdict(list)
    for r in records:
        match = _CORRELATION.match(r.dataset)
        mses = [v for m, v in r.metrics.items() if m.endswith(".mse")]
        if match and mses:
            by_cell[r.variant, float(match["p"])].append(float(np.mean(mses)))
    if not by_cell:
        return []
    ps = sorted({p for _, p in by_cell}, reverse=True)
    variants = list(dict.fromkeys(v for v, _ in by_cell))
    lines = ["| model | " + " | ".join(f"p={p:g}" for p in ps) + " |"]
    lines.append("|" + "---|" * (len(ps) + 1))
    for v in variants:
        lines.append(f"| {v} | " + " | ".join(format_stat(by_cell[v, p]) for p in ps) + " |")
    return lines


def results_markdown(
    records: Sequence[RunRecord], notes: dict[str, str], header: Sequence[str]
) -> str:
    """Return results.md: the header lines, then one table per data set (+ correlations)."""
    gains = mtl_gains(records)
    lines = list(header)
    for dataset in dict.fromkeys(r.dataset for r in records):
        lines += ["", f"### {dataset}", ""]
        if notes.get(dataset):
            lines += [notes[dataset], ""]
        lines += _dataset_table(dataset, records, gains)
    table = correlation_table(records)
    if table:
        lines += ["", "### mean task MSE by task correlation (lower is better)", "", *table]
    return "\n".join(lines) + "\n"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def plot_dataset(records: Sequence[RunRecord], dataset: str, out_dir: Path) -> Path:
    """Write a panel per headline metric of `dataset` (mean, std error bars); return the PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    summary = summarize(records)[dataset]
    variants = list(summary)
    metrics = list(dict.fromkeys(m for v in variants for m in summary[v] if _HEADLINE.match(m)))
    fig, axes = plt.subplots(
        1, max(1, len(metrics)), figsize=(4.5 * max(1, len(metrics)), 4), squeeze=False
    )
    for ax, metric in zip(axes.flat, metrics, strict=False):
        stats = [mean_std(summary[v].get(metric, [])) for v in variants]
        means = [s[0] for s in stats]
        # points, not bars: the autoscaled axis zooms in (models differ in the third decimal)
        yerr = [s[1] for s in stats]
        ax.errorbar(range(len(variants)), means, yerr=yerr, fmt="o", capsize=3, color="C0")
        ax.set_xticks(range(len(variants)), variants, rotation=60, ha="right", fontsize="small")
        ax.set_title(_metric_title(metric))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{dataset}: test metric, mean and std over seeds")
    fig.tight_layout()
    path = out_dir / f"{_safe(dataset)}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_correlation(records: Sequence[RunRecord], out_dir: Path) -> Path | None:
    """Write mean task MSE against task correlation, one line per model; None without data."""
    points: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        match = _CORRELATION.match(r.dataset)
        mses = [v for m, v in r.metrics.items() if m.endswith(".mse")]
        if match and mses:
            points[r.variant][float(match["p"])].append(float(np.mean(mses)))
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (variant, by_p) in enumerate(points.items()):
        ps = sorted(by_p)
        stats = [mean_std(by_p[p]) for p in ps]
        ax.errorbar(
            ps, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3,
            color=f"C{i % 10}", label=variant,
        )  # fmt: skip
    ax.set_xlabel("task correlation p")
    ax.set_ylabel("test MSE (mean of the two tasks)")
    ax.set_title("synthetic data: loss vs task correlation (MMoE paper fig. 4)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = out_dir / "synthetic_correlation.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
