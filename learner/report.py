"""`mtlstream report`: PNG plots of the learner's progressive-validation metrics and gates.

Input is either the daemon's metrics history (JSONL, one record per status line) or the
snapshots kept in Redis (one point per stored version, from their metadata). Output:

- ``metrics_auc.png``, ``metrics_logloss.png``, ``metrics_mse.png``: per task, the cumulative
  value (solid) and the rolling window (dashed) against samples trained;
- ``experts.png``: expert utilisation per gate, the mean and std over a batch of each expert's
  gate weight (as in the PLE paper's Figure 8), from the newest record.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import redis

from feature_store.errors import FeatureStoreError
from feature_store.registry import SnapshotRegistry
from learner.settings import LearnerSettings
from mtlstream.settings import from_env

__all__ = [
    "configure",
    "history_from_redis",
    "main",
    "plot_experts",
    "plot_metrics",
    "read_history",
    "write_report",
]

logger = logging.getLogger(__name__)

History = list[dict[str, Any]]
_METRIC_PLOTS = {"auc": "AUC", "logloss": "log loss", "mse": "MSE"}


def read_history(path: Path) -> History:
    """Read a metrics history file; lines that are not JSON objects are skipped with a warning."""
    records: History = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                logger.warning("%s:%d is not JSON, skipped", path, number)
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def history_from_redis(registry: SnapshotRegistry) -> History:
    """One record per stored snapshot (oldest first), built from its metadata."""
    records: History = []
    for version in registry.versions():
        try:
            meta = registry.load(version).meta
        except FeatureStoreError as exc:  # pruned meanwhile, or corrupt: skip that point
            logger.warning("version %d skipped: %s", version, exc)
            continue
        records.append(
            {
                "ts": meta.get("created_at"),
                "version": version,
                "step": meta.get("step"),
                "samples": meta.get("samples_seen"),
                "metrics": meta.get("metrics") or {},
                "gates": meta.get("gates") or {},
            }
        )
    return records


def _series(history: History, key: str) -> tuple[list[float], list[float]]:
    xs: list[float] = []
    ys: list[float] = []
    for record in history:
        value = (record.get("metrics") or {}).get(key)
        x = record.get("samples")
        if isinstance(value, int | float) and isinstance(x, int | float) and math.isfinite(value):
            xs.append(float(x))
            ys.append(float(value))
    return xs, ys


def _tasks_with(history: History, metric: str) -> list[str]:
    tasks: dict[str, None] = {}
    for record in history:
        for key in record.get("metrics") or {}:
            task, _, name = key.partition(".")
            if name == metric:
                tasks[task] = None
    return list(tasks)


def plot_metrics(history: History, out_dir: Path) -> list[Path]:
    """Write one PNG per metric with a line per task; return the files written."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    written: list[Path] = []
    for metric, title in _METRIC_PLOTS.items():
        tasks = _tasks_with(history, metric)
        if not tasks:
            continue
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for i, task in enumerate(tasks):
            color = f"C{i}"
            xs, ys = _series(history, f"{task}.{metric}")
            # markers: a short run may have a single point, which a bare line does not draw
            ax.plot(xs, ys, color=color, marker="o", ms=3, label=f"{task} (cumulative)")
            xs, ys = _series(history, f"{task}.{metric}_w")
            ax.plot(xs, ys, color=color, marker="x", ms=3, ls="--", label=f"{task} (window)")
        ax.set_xlabel("samples trained")
        ax.set_ylabel(title)
        ax.set_title(f"progressive validation: {title} per task")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        path = out_dir / f"metrics_{metric}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def plot_experts(gates: Mapping[str, Mapping[str, Sequence[float]]], out_dir: Path) -> Path | None:
    """Write a bar chart per gate: mean (bars) and std (error bars) of each expert's weight."""
    if not gates:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = sorted(gates)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        mean, std = list(gates[name]["mean"]), list(gates[name]["std"])
        ax.bar(range(len(mean)), mean, yerr=std, capsize=3, color="C0")
        ax.set_title(name, fontsize="small")
        ax.set_xlabel("expert")
        ax.set_ylim(0, 1)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle("expert utilisation: gate weight mean and std over a batch")
    fig.tight_layout()
    path = out_dir / "experts.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(history: History, out_dir: Path) -> list[Path]:
    """Write every plot the history supports into `out_dir`; return the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = plot_metrics(history, out_dir)
    gates: dict[str, dict[str, list[float]]] = next(
        (r["gates"] for r in reversed(history) if r.get("gates")), {}
    )
    experts = plot_experts(gates, out_dir)
    if experts is not None:
        written.append(experts)
    return written


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the `report` flags."""
    parser.add_argument(
        "--from",
        dest="source",
        choices=("file", "redis"),
        default="file",
        help="read the metrics history file (default) or the snapshots in Redis",
    )
    parser.add_argument(
        "--metrics-file", type=Path, help="history JSONL (default: the learner's settings)"
    )
    parser.add_argument("--redis-url", help="Redis URL (default: REDIS_URL)")
    parser.add_argument("--namespace", help="Redis key prefix (default: MTL_NAMESPACE)")
    parser.add_argument("--model-name", help="snapshot name (default: MTL_MODEL_NAME)")
    parser.add_argument("--out", type=Path, required=True, help="directory for the PNG files")


def main(args: argparse.Namespace) -> int:
    """Write the report; exit 1 when there is nothing to plot."""
    settings = from_env(
        LearnerSettings,
        redis_url=args.redis_url,
        namespace=args.namespace,
        model_name=args.model_name,
    )
    if args.source == "redis":
        client = redis.Redis.from_url(settings.redis_url)
        try:
            registry = SnapshotRegistry(client, settings.model_name, settings.namespace)
            history = history_from_redis(registry)
        finally:
            client.close()
    else:
        path = args.metrics_file or settings.metrics_path
        if not path.is_file():
            logger.error("no metrics history at %s", path)
            return 1
        history = read_history(path)
    if not history:
        logger.error("nothing to plot: the history is empty")
        return 1
    written = write_report(history, args.out)
    logger.info("report records=%d files=%s", len(history), ",".join(str(p) for p in written))
    return 0
