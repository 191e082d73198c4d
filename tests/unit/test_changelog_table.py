"""ChangelogTable: every change of the mapping is also a changelog record, reads are not."""

from __future__ import annotations

from typing import Any

import pytest

from stream.output import BatchOutput, ChangelogTable, OutputSettings


def _table() -> tuple[ChangelogTable, BatchOutput]:
    output = BatchOutput(OutputSettings("127.0.0.1:1"))  # never started: only buffers
    table = ChangelogTable({}, "log", output)
    table.partition = 3
    return table, output


def test_writes_and_deletes_are_buffered_for_the_table_partition() -> None:
    table, output = _table()
    table[b"a"] = b"1"
    table[b"b"] = b"2"
    del table[b"a"]
    assert table.pop(b"b") == b"2"
    assert output.buffers == {("log", 3): [(b"a", b"1"), (b"b", b"2"), (b"a", None), (b"b", None)]}
    assert dict(table) == {}


def test_reads_and_misses_write_nothing() -> None:
    table, output = _table()
    table[b"a"] = b"1"
    assert table.get(b"a") == b"1" and table.get(b"x") is None and table.get(b"x", b"d") == b"d"
    assert table.pop(b"x", None) is None
    with pytest.raises(KeyError):
        table.pop(b"x")
    records: list[Any] = output.buffers[("log", 3)]
    assert records == [(b"a", b"1")]
