"""`mtlstream features load`: JSONL / CSV / Parquet into a real Redis, bad rows by line number."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from feature_store.keys import Entity
from feature_store.load import BadRow, LoadOptions, load_file, to_write
from feature_store.store import FeatureStore

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(redis_client: redis.Redis, namespace: str) -> FeatureStore:
    return FeatureStore(redis_client, namespace)


def _features(store: FeatureStore, entity: Entity, ids: list[str]) -> list[Any]:
    return [None if r is None else r.features for r in store.read(entity, ids)]


def test_jsonl_loads_good_rows_and_reports_bad_ones_by_line(
    store: FeatureStore, tmp_path: Path
) -> None:
    path = tmp_path / "users.jsonl"
    lines = [
        orjson.dumps({"user_id": "u1", "ts": 100, "user_segment": "s1", "user_activity": 2.5}),
        b"{not json",
        orjson.dumps({"user_id": "u2", "ts": 100, "user_segment": None, "user_activity": 1}),
        b"",
        orjson.dumps([1, 2]),
        orjson.dumps({"ts": 100, "user_segment": "s9"}),  # no id
        orjson.dumps({"user_id": "u3", "user_segment": "s3"}),  # no ts
        orjson.dumps({"user_id": "u:4", "ts": 1, "user_segment": "s4"}),  # bad id
        orjson.dumps({"user_id": "u5", "ts": 1, "tags": ["a"]}),  # not a scalar
        orjson.dumps({"user_id": 6, "ts": 7.0, "user_activity": 0.5}),  # int id, integral ts
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    seen: list[BadRow] = []
    report = load_file(store, path, LoadOptions(entity="user", batch_size=2), on_bad=seen.append)
    assert (report.rows, report.applied, report.stale, report.bad) == (9, 3, 0, 6)
    assert [b.line for b in report.bad_rows] == [2, 5, 6, 7, 8, 9] == [b.line for b in seen]
    reasons = {b.line: b.reason for b in report.bad_rows}
    assert "not JSON" in reasons[2] and "not a JSON object" in reasons[5]
    assert "no id" in reasons[6] and "event time" in reasons[7]
    assert "':'" in reasons[8] or "character" in reasons[8]
    assert "tags" in reasons[9]
    assert _features(store, "user", ["u1", "u2", "6", "u3"]) == [
        {"user_segment": "s1", "user_activity": 2.5},
        {"user_activity": 1},
        {"user_activity": 0.5},
        None,
    ]


def test_newest_event_time_wins_whatever_the_row_order(store: FeatureStore, tmp_path: Path) -> None:
    path = tmp_path / "items.jsonl"
    rows = [
        {"item_id": "i1", "ts": 200, "item_price": 2.0},
        {"item_id": "i1", "ts": 100, "item_price": 1.0},  # older: ignored
        {"item_id": "i1", "ts": 300, "item_price": 3.0},
        {"item_id": "i2", "ts": 50, "item_price": 5.0},
    ]
    path.write_bytes(b"\n".join(orjson.dumps(r) for r in rows))
    report = load_file(store, path, LoadOptions(entity="item", batch_size=1))
    assert (report.applied, report.stale, report.bad) == (3, 1, 0)
    again = load_file(store, path, LoadOptions(entity="item"))  # a replay changes nothing
    assert again.applied == 2 and again.stale == 2  # ties (same ts) re-apply the same values
    found = store.read("item", ["i1", "i2"])
    assert found[0] is not None and found[0].features == {"item_price": 3.0}
    assert found[0].ts_ms == 300


def test_csv_types_cells_and_reports_ragged_rows(store: FeatureStore, tmp_path: Path) -> None:
    path = tmp_path / "items.csv"
    path.write_text(
        "item_id,ts,item_price,item_category,code\n"
        "i1,100,9.5,c7,007\n"
        "i2,100,,c8,1e3\n"
        "i3,100,1.0\n"
        'i4,100,2,"multi\nline",x\n'
        "i5,100,3,c9,y,extra\n"
        "i6,,4,c1,z\n",
        encoding="utf-8",
    )
    report = load_file(store, path, LoadOptions(entity="item"), progress=True)
    assert report.bad == 3 and report.applied == 3
    assert [b.line for b in report.bad_rows] == [4, 7, 8]
    assert "3 cells" in report.bad_rows[0].reason and "6 cells" in report.bad_rows[1].reason
    assert _features(store, "item", ["i1", "i2", "i4"]) == [
        {"item_price": 9.5, "item_category": "c7", "code": "007"},
        {"item_category": "c8", "code": 1000.0},
        {"item_price": 2, "item_category": "multi\nline", "code": "x"},
    ]


def test_parquet_rows_with_timestamps_and_nulls(store: FeatureStore, tmp_path: Path) -> None:
    import datetime as dt

    path = tmp_path / "users.parquet"
    table = pa.table(
        {
            "user_id": ["u1", "u2", None, "u4"],
            "ts": [
                dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
                dt.datetime(2024, 1, 2),
                dt.datetime(2024, 1, 3),
                dt.datetime(2024, 1, 4),
            ],
            "user_activity": [1.5, None, 2.0, float("nan")],
            "user_segment": ["s1", "s2", "s3", "s4"],
        }
    )
    pq.write_table(table, path, row_group_size=2)
    report = load_file(store, path, LoadOptions(entity="user", batch_size=3))
    assert (report.rows, report.applied, report.bad) == (4, 2, 2)
    assert [b.line for b in report.bad_rows] == [3, 4]
    assert "no id" in report.bad_rows[0].reason and "finite" in report.bad_rows[1].reason
    found = store.read("user", ["u1", "u2"])
    assert found[0] is not None and found[0].ts_ms == 1_704_067_200_000
    assert found[0].features == {"user_activity": 1.5, "user_segment": "s1"}
    assert found[1] is not None and found[1].features == {"user_segment": "s2"}


def test_a_default_event_time_and_a_custom_id_column() -> None:
    options = LoadOptions(entity="item", id_field="sku", default_ts_ms=5)
    assert to_write({"sku": "A1", "item_price": 1}, options).ts_ms == 5
    with pytest.raises(ValueError, match="no id"):
        to_write({"item_id": "A1", "item_price": 1}, options)
    with pytest.raises(ValueError, match="no feature values"):
        to_write({"sku": "A1", "ts": 3}, options)


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mtlstream", "features", *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_load_and_get(redis_url: str, namespace: str, tmp_path: Path) -> None:
    good = tmp_path / "items.csv"
    good.write_text("item_id,ts,item_price\ni1,10,1.5\ni2,10,2.5\n")
    bad = tmp_path / "more.jsonl"
    bad.write_text('{"item_id": "i3", "ts": 10, "item_price": 3}\n{oops\n')
    env = {"REDIS_URL": redis_url, "MTL_NAMESPACE": namespace}
    ok = _cli("load", str(good), "--entity", "item", env=env)
    assert ok.returncode == 0, ok.stderr
    assert "rows=2 applied=2 stale=0 bad=0" in ok.stdout
    partial = _cli("load", str(bad), "--entity", "item", env=env)
    assert partial.returncode == 1
    assert f"{bad}:2: bad row: not JSON" in partial.stderr
    assert "rows=2 applied=1 stale=0 bad=1" in partial.stdout
    got = _cli("get", "i1", "i3", "nope", "--entity", "item", env=env)
    lines = [orjson.loads(line) for line in got.stdout.splitlines()]
    assert got.returncode == 1  # one id has no features
    assert lines[0] == {"id": "i1", "row": {"features": {"item_price": 1.5}, "ts": 10}}
    assert lines[1]["row"]["features"] == {"item_price": 3}
    assert lines[2] == {"id": "nope", "row": None}
