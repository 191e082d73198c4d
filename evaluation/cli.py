"""`mtlstream evaluate`: train and compare multi-task models offline, write tables and plots.

For each seed, each data set of ``--dataset`` and each model variant: build the model (the
learner's own, or a DeepCTR-Torch baseline), train it for the budget, keep the best epoch on
validation, score the test split. Writes ``results.md`` (mean ± std over seeds, MTL gain),
``results.json`` (every run) and PNG plots into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import torch

from evaluation.census import GROUPS, load_census
from evaluation.datasets import Dataset
from evaluation.experiments import (
    MODELS,
    TARGETS,
    WEIGHTINGS,
    Architecture,
    RunRecord,
    Variant,
    run_variant,
    variants,
)
from evaluation.movielens import load_movielens
from evaluation.report import plot_correlation, plot_dataset, results_markdown
from evaluation.synthetic import CORRELATIONS, load_synthetic
from evaluation.train import Budget
from evaluation.world import load_world

__all__ = ["PLANS", "Plan", "configure", "main"]

logger = logging.getLogger(__name__)

Loader = Callable[[int, argparse.Namespace], list[Dataset]]


@dataclass(frozen=True)
class Plan:
    """The defaults of one ``--dataset``: what it loads and the budget every model gets."""

    load: Loader  # (seed, args) -> the data sets of that seed
    parts: Callable[[argparse.Namespace], int]  # how many data sets `load` returns
    epochs: int  # default --epochs
    batch_size: int  # default --batch-size
    models: tuple[str, ...]  # default --models
    weightings: tuple[str, ...] = ("static",)  # default --weightings
    targets: tuple[str, ...] = ("raw",)  # default --targets (regression tasks)
    esmm_forms: tuple[bool, ...] = (False,)  # run without and/or with ESMM
    arch: Architecture = field(default_factory=Architecture)  # sizes shared by every model


PLANS: dict[str, Plan] = {
    "census": Plan(
        load=lambda seed, a: [load_census(g, seed) for g in a.groups],
        parts=lambda a: len(a.groups),
        epochs=4,
        batch_size=1024,
        models=MODELS,
    ),
    "synthetic": Plan(
        load=lambda seed, a: [load_synthetic(p, seed) for p in a.correlations],
        parts=lambda a: len(a.correlations),
        epochs=12,
        batch_size=128,
        models=MODELS,
        # two-layer experts: the learner's synthetic test found one layer too shallow for
        # the sine mixture (shared-bottom then won at every correlation)
        arch=Architecture(expert_hidden=(64, 32), tower_hidden=(16,)),
    ),
    "world": Plan(
        load=lambda seed, a: [load_world(seed, a.impressions, a.rho)],
        parts=lambda a: 1,
        epochs=3,
        batch_size=1024,
        models=("single", "mmoe", "ple"),
        esmm_forms=(False, True),
    ),
    "movielens": Plan(
        load=lambda seed, a: [load_movielens(seed)],
        parts=lambda a: 1,
        epochs=5,
        batch_size=512,
        models=MODELS,
        weightings=WEIGHTINGS,
        targets=TARGETS,
    ),
}


def _choices(allowed: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: a comma-separated subset of `allowed`, in the given order."""

    def parse(text: str) -> tuple[str, ...]:
        items = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
        unknown = [s for s in items if s not in allowed]
        if unknown or not items:
            raise argparse.ArgumentTypeError(
                f"{text!r}: choose from {', '.join(allowed)} (comma-separated)"
            )
        return items

    return parse


def _numbers(kind: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    def parse(text: str) -> tuple[Any, ...]:
        try:
            return tuple(kind(s) for s in text.split(",") if s.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from exc

    return parse


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the `evaluate` arguments."""
    parser.add_argument("--dataset", choices=sorted(PLANS), required=True)
    parser.add_argument(
        "--models", type=_choices(MODELS), help=f"comma-separated, from {','.join(MODELS)}"
    )
    parser.add_argument("--seeds", type=_positive, default=3, help="runs seeds 0..N-1")
    parser.add_argument("--epochs", type=_positive, help="epochs per run (default per dataset)")
    parser.add_argument("--batch-size", type=_positive, help="rows per step (default per dataset)")
    parser.add_argument("--max-rows", type=_positive, help="subsample every split to N rows")
    parser.add_argument("--weightings", type=_choices(WEIGHTINGS), help="static,uwl")
    parser.add_argument("--targets", type=_choices(TARGETS), help="regression labels: raw,log1p")
    parser.add_argument("--out", type=Path, help="output folder (default out/evaluate-DATASET)")
    parser.add_argument("--threads", type=_positive, default=1, help="torch intra-op threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    group = parser.add_argument_group("data set options")
    group.add_argument("--groups", type=_numbers(int), default=tuple(GROUPS), help="census")
    group.add_argument(
        "--correlations", type=_numbers(float), default=CORRELATIONS, help="synthetic"
    )
    group.add_argument("--impressions", type=_positive, default=300_000, help="world")
    group.add_argument("--rho", type=float, default=0.5, help="world: click/conversion corr.")


def _command(args: argparse.Namespace, budget: Budget, models: Sequence[str]) -> str:
    """The command line that reproduces this run, every default made explicit."""
    parts = [
        "mtlstream evaluate",
        f"--dataset {args.dataset}",
        f"--models {','.join(models)}",
        f"--seeds {args.seeds}",
        f"--epochs {budget.epochs}",
        f"--batch-size {budget.batch_size}",
    ]
    if args.weightings:
        parts.append(f"--weightings {','.join(args.weightings)}")
    if args.targets:
        parts.append(f"--targets {','.join(args.targets)}")
    if args.max_rows:
        parts.append(f"--max-rows {args.max_rows}")
    extra = {
        "census": f"--groups {','.join(map(str, args.groups))}",
        "synthetic": f"--correlations {','.join(f'{p:g}' for p in args.correlations)}",
        "world": f"--impressions {args.impressions} --rho {args.rho:g}",
    }
    if args.dataset in extra:
        parts.append(extra[args.dataset])
    return " ".join(parts) + f" --threads {args.threads}"


def _header(args: argparse.Namespace, plan: Plan, budget: Budget, command: str) -> list[str]:
    return [
        f"## mtlstream evaluate: {args.dataset}",
        "",
        f"Command: `{command} --out DIR`",
        "",
        f"Budget, the same for every model: {budget.epochs} epochs, batch {budget.batch_size}, "
        f"Adam lr {budget.lr:g} (dense) / {budget.embedding_lr:g} (embeddings), grad clip "
        f"{budget.grad_clip:g}; the epoch with the best validation score (mean over tasks of "
        "AUC, or 1 - MSE/Var) is kept and scored on the test split. "
        f"Seeds 0..{args.seeds - 1}: each seed draws the split (or data), the initialisation "
        "and the batch order; ± is the sample std over seeds."
        + (f" Every split subsampled to at most {args.max_rows} rows." if args.max_rows else ""),
        "",
        f"Sizes: {dataclasses.asdict(plan.arch)} (CGC/PLE: 1 task + 1 shared expert per "
        "level; shared-bottom as wide as the experts together). AUC for binary tasks, MSE on "
        "the label scale otherwise; MTL gain = model - single-task (AUC) or single - model "
        "(MSE) on the same seed, positive = better.",
    ]


def _run_all(
    args: argparse.Namespace, plan: Plan, runs: list[Variant], budget: Budget
) -> tuple[list[RunRecord], dict[str, str]]:
    from tqdm import tqdm

    records: list[RunRecord] = []
    notes: dict[str, str] = {}
    total = args.seeds * plan.parts(args) * len(runs) * budget.epochs
    with tqdm(total=total, unit="epoch", disable=args.no_progress, mininterval=1.0) as bar:
        for seed in range(args.seeds):
            for data in plan.load(seed, args):
                data = data.capped(args.max_rows, seed)
                notes[data.name] = data.note
                for variant in runs:
                    bar.set_postfix_str(f"{data.name} {variant.label} seed={seed}")
                    record = run_variant(
                        variant, data, plan.arch, budget, seed, lambda e, s: bar.update(1)
                    )
                    records.append(record)
    return records, notes


def main(args: argparse.Namespace) -> int:
    """Run the comparison and write results.md, results.json and the plots; return 0."""
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    plan = PLANS[args.dataset]
    models = args.models or plan.models
    budget = Budget(
        epochs=args.epochs or plan.epochs, batch_size=args.batch_size or plan.batch_size
    )
    runs = variants(
        models, args.weightings or plan.weightings, args.targets or plan.targets, plan.esmm_forms
    )
    out: Path = args.out or Path("out") / f"evaluate-{args.dataset}"
    out.mkdir(parents=True, exist_ok=True)
    records, notes = _run_all(args, plan, runs, budget)
    command = _command(args, budget, models)
    header = _header(args, plan, budget, command)
    header.append(f"\nWall time: {time.perf_counter() - started:.0f} s.")
    (out / "results.md").write_text(results_markdown(records, notes, header))
    payload = {"command": command, "records": [dataclasses.asdict(r) for r in records]}
    (out / "results.json").write_bytes(orjson.dumps(payload, option=orjson.OPT_INDENT_2))
    plots = [plot_dataset(records, name, out) for name in notes]
    correlation = plot_correlation(records, out)
    plots += [correlation] if correlation else []
    logger.info(
        "evaluate dataset=%s runs=%d seconds=%.0f out=%s plots=%d",
        args.dataset,
        len(records),
        time.perf_counter() - started,
        out,
        len(plots),
    )
    return 0
