"""`mtlstream evaluate` end to end on tiny budgets: tables, records and plots for every model."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import torch

from evaluation.cli import configure, main
from evaluation.experiments import MODELS


@pytest.fixture(autouse=True)
def restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()  # main() sets torch's process-wide thread count
    yield
    torch.set_num_threads(threads)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mtlstream evaluate")
    configure(parser)
    return parser.parse_args(list(argv))


def _table_rows(markdown: str, heading: str) -> list[str]:
    """The first cell of every body row of the table under `### heading`."""
    section = markdown.split(f"### {heading}\n", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [row.split("|")[1].strip() for row in rows[1:]]


def test_census_run_writes_a_table_with_every_model(tmp_path: Path) -> None:
    args = parse(
        "--dataset", "census", "--groups", "1", "--max-rows", "300", "--epochs", "1",
        "--seeds", "2", "--out", str(tmp_path), "--no-progress",
    )  # fmt: skip
    assert main(args) == 0
    markdown = (tmp_path / "results.md").read_text()
    assert _table_rows(markdown, "census/group1") == list(MODELS)
    assert "--dataset census" in markdown and "at most 300 rows" in markdown
    records = orjson.loads((tmp_path / "results.json").read_bytes())["records"]
    assert len(records) == 2 * len(MODELS)
    assert {r["seed"] for r in records} == {0, 1}
    for record in records:
        assert set(record["metrics"]) == {"income.auc", "marital.auc"}
        assert all(0.0 <= v <= 1.0 for v in record["metrics"].values())
    assert (tmp_path / "census_group1.png").stat().st_size > 0


def test_movielens_run_crosses_weightings_and_targets(tmp_path: Path) -> None:
    args = parse(
        "--dataset", "movielens", "--models", "single,mmoe", "--max-rows", "400",
        "--epochs", "1", "--seeds", "1", "--out", str(tmp_path), "--no-progress",
    )  # fmt: skip
    assert main(args) == 0
    rows = _table_rows((tmp_path / "results.md").read_text(), "movielens")
    assert rows == [
        "single", "single/uwl", "single/log1p", "single/uwl/log1p",
        "mmoe", "mmoe/uwl", "mmoe/log1p", "mmoe/uwl/log1p",
    ]  # fmt: skip


def test_synthetic_run_adds_the_correlation_table_and_plot(tmp_path: Path) -> None:
    args = parse(
        "--dataset", "synthetic", "--models", "shared_bottom,mmoe", "--correlations", "1,0",
        "--max-rows", "200", "--epochs", "1", "--seeds", "1", "--out", str(tmp_path),
        "--no-progress",
    )  # fmt: skip
    assert main(args) == 0
    markdown = (tmp_path / "results.md").read_text()
    assert _table_rows(markdown, "mean task MSE by task correlation (lower is better)") == [
        "shared_bottom",
        "mmoe",
    ]
    assert (tmp_path / "synthetic_correlation.png").exists()


def test_world_run_compares_esmm_with_clicked_only_cvr(tmp_path: Path) -> None:
    args = parse(
        "--dataset", "world", "--models", "mmoe", "--impressions", "3000", "--epochs", "1",
        "--seeds", "1", "--out", str(tmp_path), "--no-progress",
    )  # fmt: skip
    assert main(args) == 0
    records = orjson.loads((tmp_path / "results.json").read_bytes())["records"]
    assert [r["variant"] for r in records] == ["mmoe", "mmoe+esmm"]
    assert {"cvr.auc_true", "cvr.bias", "ctcvr.auc_true"} <= set(records[0]["metrics"])


def test_unknown_model_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("--dataset", "census", "--models", "ple,xgboost")
    assert "choose from" in capsys.readouterr().err
