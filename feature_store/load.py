"""Bulk feature loading from JSONL, CSV or Parquet files (``mtlstream features load``).

Each row is one entity: an id column (default ``user_id`` / ``item_id``), an event-time column
(default ``ts``, epoch ms; a Parquet timestamp works too) and one column per feature. Null or
empty cells are skipped (the stored value stays). Good rows are written in batches through
:meth:`FeatureStore.write`, so the newest event time wins per entity, whatever the order of rows
or files. A bad row (not an object, no id, bad event time, a feature value that is not a finite
number, a string or a bool) is reported with its line number (the row number for Parquet) and
skipped; the rest of the file still loads.

CSV has no types: a cell that is a JSON number (``3``, ``-0.5``, ``1e3``) becomes a number, any
other cell stays a string (so ``007`` and ``c7`` are strings), an empty cell is missing.

Examples
--------
>>> csv_value("9.5"), csv_value("007"), csv_value(""), csv_value("true")
(9.5, '007', None, 'true')
>>> options = LoadOptions(entity="item")
>>> to_write({"item_id": "i1", "ts": 5, "item_price": 2.5, "note": None}, options)
FeatureWrite(entity_id='i1', features={'item_price': 2.5}, ts_ms=5)
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

import orjson

from feature_store.errors import InvalidFeatureError, InvalidKeyPartError
from feature_store.keys import Entity, check_part
from feature_store.store import FeatureStore, FeatureWrite, check_ts, encode_features

__all__ = [
    "FORMATS",
    "BadRow",
    "LoadOptions",
    "LoadReport",
    "csv_value",
    "detect_format",
    "load_file",
    "read_rows",
    "to_write",
]

logger = logging.getLogger(__name__)

Format: TypeAlias = Literal["jsonl", "csv", "parquet"]
#: File formats by extension; anything else needs ``--format``.
FORMATS: dict[str, Format] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}

# JSON's number grammar: what a CSV cell must match to become a number
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][-+]?\d+)?")


@dataclass(frozen=True)
class LoadOptions:
    """How to read rows and write them."""

    entity: Entity = "user"
    # column holding the entity id; None = "<entity>_id"
    id_field: str | None = None
    # column holding the event time (epoch ms, or a timestamp)
    ts_field: str = "ts"
    # event time for rows without one; None = such rows are bad
    default_ts_ms: int | None = None
    # rows per Redis round trip
    batch_size: int = 1000
    # expire entities this many seconds after their last write; None = never
    ttl_s: int | None = None

    def __post_init__(self) -> None:
        if self.entity not in ("user", "item"):
            raise ValueError(f"entity must be 'user' or 'item', got {self.entity!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.default_ts_ms is not None:
            check_ts(self.default_ts_ms)

    @property
    def id_column(self) -> str:
        """The id column actually used."""
        return self.id_field or f"{self.entity}_id"


@dataclass(frozen=True)
class BadRow:
    """A row that was not loaded: its line (row number for Parquet) and why."""

    line: int
    reason: str


@dataclass
class LoadReport:
    """What a load did."""

    rows: int = 0  # rows read (good + bad)
    applied: int = 0  # rows written (not older than what Redis held)
    stale: int = 0  # good rows ignored because Redis held a newer event time
    bad: int = 0  # rows skipped as invalid
    bad_rows: list[BadRow] = field(default_factory=list)  # the first ones, for the report
    seconds: float = 0.0

    def line(self) -> str:
        """One ``key=value`` summary line."""
        return (
            f"rows={self.rows} applied={self.applied} stale={self.stale} bad={self.bad} "
            f"seconds={self.seconds:.2f}"
        )


def detect_format(path: Path) -> Format:
    """Pick the format from the file extension."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"{path}: unknown extension {path.suffix!r}; pass a format (jsonl/csv/parquet)"
        )
    return fmt


def csv_value(cell: str) -> object:
    """Type one CSV cell: JSON numbers become numbers, empty cells missing, the rest strings."""
    if cell == "":
        return None
    if _NUMBER.fullmatch(cell):
        try:
            return orjson.loads(cell)
        except orjson.JSONDecodeError:  # beyond a double's range: keep the text
            return cell
    return cell


_Row: TypeAlias = tuple[int, Mapping[str, Any] | BadRow]


def _jsonl_rows(path: Path) -> Iterator[_Row]:
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                yield number, BadRow(number, f"not JSON: {exc}")
                continue
            if not isinstance(obj, dict):
                yield number, BadRow(number, f"not a JSON object but {type(obj).__name__}")
                continue
            yield number, obj


def _csv_rows(path: Path) -> Iterator[_Row]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        for cells in reader:
            number = reader.line_num  # last physical line of the record (quoted newlines count)
            if not cells:
                continue
            if len(cells) != len(header):
                reason = f"{len(cells)} cells, the header has {len(header)} columns"
                yield number, BadRow(number, reason)
            else:
                yield number, {k: csv_value(v) for k, v in zip(header, cells, strict=True)}


def _parquet_rows(path: Path, batch_size: int) -> Iterator[_Row]:
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
        for record in batch.to_pylist():
            number += 1
            yield number, record


def read_rows(path: Path, fmt: Format, batch_size: int = 1000) -> Iterator[_Row]:
    """Yield ``(line, row or BadRow)`` for every row of a file."""
    if fmt == "jsonl":
        return _jsonl_rows(path)
    if fmt == "csv":
        return _csv_rows(path)
    if fmt == "parquet":
        return _parquet_rows(path, batch_size)
    raise ValueError(f"unknown format {fmt!r}; one of {sorted(set(FORMATS.values()))}")


def _entity_id(value: object, column: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError(f"{column} must be a string or an integer, got {value!r}")
    return check_part(value, column)


def _event_time(value: object, options: LoadOptions) -> int:
    if value is None:
        if options.default_ts_ms is None:
            raise ValueError(f"no event time ({options.ts_field}); pass a default event time")
        return options.default_ts_ms
    if isinstance(value, dt.datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
        return int(aware.timestamp() * 1000)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return check_ts(value)


def to_write(record: Mapping[str, Any], options: LoadOptions) -> FeatureWrite:
    """Validate one row and turn it into a write; raise ValueError with the reason if bad."""
    column = options.id_column
    if record.get(column) is None:
        raise ValueError(f"no id ({column})")
    entity_id = _entity_id(record[column], column)
    ts_ms = _event_time(record.get(options.ts_field), options)
    skip = {column, options.ts_field}
    features = {k: v for k, v in record.items() if k not in skip and v is not None}
    if not features:
        raise ValueError("no feature values")
    encode_features(features)  # raises InvalidFeatureError naming the bad feature
    return FeatureWrite(entity_id, features, ts_ms)


def _progress(total: int | None, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="rows", disable=not enabled, mininterval=0.5)


def _parquet_total(path: Path) -> int:
    import pyarrow.parquet as pq

    return int(pq.ParquetFile(path).metadata.num_rows)


def load_file(
    store: FeatureStore,
    path: Path,
    options: LoadOptions,
    fmt: Format | None = None,
    progress: bool = False,
    max_reported: int = 100,
    on_bad: Callable[[BadRow], None] | None = None,
) -> LoadReport:
    """Load a file's good rows into Redis in batches; report the bad ones by line.

    Parameters
    ----------
    store
        Where to write (sync client).
    path
        A JSONL, CSV or Parquet file.
    options
        Entity, columns, default event time, batch size, TTL.
    fmt
        File format; None = from the extension.
    progress
        Show a tqdm progress bar (stderr).
    max_reported
        Bad rows kept in the report (all are counted, and all go to ``on_bad``).
    on_bad
        Called with each bad row as it is found.
    """
    fmt = fmt or detect_format(path)
    report = LoadReport()
    started = time.perf_counter()
    batch: list[FeatureWrite] = []

    def flush() -> None:
        applied = store.write(options.entity, batch, options.ttl_s)
        report.applied += applied
        report.stale += len(batch) - applied
        batch.clear()

    total = _parquet_total(path) if fmt == "parquet" else None
    with _progress(total, progress) as bar:
        for number, row in read_rows(path, fmt, options.batch_size):
            report.rows += 1
            bar.update(1)
            if not isinstance(row, BadRow):
                try:
                    batch.append(to_write(row, options))
                except (ValueError, InvalidFeatureError, InvalidKeyPartError) as exc:
                    row = BadRow(number, str(exc))
            if isinstance(row, BadRow):
                report.bad += 1
                if len(report.bad_rows) < max_reported:
                    report.bad_rows.append(row)
                if on_bad is not None:
                    on_bad(row)
            if len(batch) >= options.batch_size:
                flush()
        if batch:
            flush()
    report.seconds = time.perf_counter() - started
    return report
