"""The scorer's read path, pure parts: bulk key building, bulk decoding, RESP packing, columns.

Each shortcut is checked against the plain per-item code it replaces (River's reference checks).
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from feature_store.errors import InvalidKeyPartError
from feature_store.keys import KeySpace
from feature_store.pipe import pack_step
from feature_store.store import (
    FieldColumns,
    FieldRows,
    KeyedCommands,
    columns_from_replies,
    decode_value,
    decode_values,
    encode_value,
    feature_keys,
    rows_from_values,
    surely_valid_parts,
)

ODD_IDS = ["i1", "é", "x" * 64, "x" * 65, "日本" * 40, "a-b_c.d", "UPPER", "0"]


def test_feature_keys_equal_keyspace_for_valid_ids() -> None:
    keys = KeySpace("t1:")
    assert feature_keys(keys, "item", ODD_IDS) == [keys.item_features(i) for i in ODD_IDS]
    assert feature_keys(keys, "user", ["u"]) == [keys.user_features("u")]


@pytest.mark.parametrize("bad", ["a:b", "", "with space", "tab\t", "x" * 257, "glob*", "{tag}"])
def test_feature_keys_raise_the_keyspace_error_for_a_bad_id(bad: str) -> None:
    keys = KeySpace()
    with pytest.raises(InvalidKeyPartError) as expected:
        keys.item_features(bad)
    with pytest.raises(InvalidKeyPartError) as got:
        feature_keys(keys, "item", ["ok", bad, "ok2"])
    assert str(got.value) == str(expected.value)


def test_surely_valid_parts_is_conservative() -> None:
    assert surely_valid_parts(["a", "b"], 8)
    assert not surely_valid_parts([], 8)
    assert not surely_valid_parts(["a", 3], 8)
    assert not surely_valid_parts(["abc"], 8)  # 3 chars might be 12 bytes: check one by one
    rng = random.Random(3)
    alphabet = "ab:{}*? \t\x00é-_"
    for _ in range(500):
        ids = ["".join(rng.choices(alphabet, k=rng.randrange(0, 4))) for _ in range(3)]
        if surely_valid_parts(ids, 16):  # then every id passes the real check
            assert feature_keys(KeySpace(), "item", ids)


def _stored(value: Any) -> bytes:
    return encode_value(value).encode()


def test_decode_values_equals_decode_value_one_by_one() -> None:
    rng = random.Random(0)
    pool: list[bytes | None] = [
        None,
        _stored(1.5),
        _stored(-3),
        _stored("c7"),
        _stored('quote " and \\ backslash'),
        _stored(True),
        _stored("é"),
        b"1e400",  # not a double: stays text in both
    ]
    for _ in range(200):
        raw = [rng.choice(pool) for _ in range(rng.randrange(0, 12))]
        expected = [None if v is None else decode_value(v) for v in raw]
        assert decode_values(raw) == expected


@pytest.mark.parametrize(
    "odd", [b"typed by hand", b"[1, 2]", b'{"a": 1}', b"null", b"", "str reply"]
)
def test_decode_values_falls_back_for_values_that_are_not_json_scalars(odd: bytes | str) -> None:
    raw: list[bytes | str | None] = [b"1", odd, None, b'"x"']
    assert decode_values(raw) == [1, decode_value(odd), None, "x"]


def test_rows_from_values_cuts_rows_and_marks_empty_ones() -> None:
    assert rows_from_values([], 3) == []
    assert rows_from_values([None, None, 0, None], 2) == [None, [0, None]]
    with pytest.raises(ValueError):
        rows_from_values([1], 0)


def test_pack_step_equals_redis_pys_packing() -> None:
    import redis.connection

    connection_class: Any = redis.connection.Connection  # redis-py leaves it untyped
    connection = connection_class()
    step: list[tuple[Any, ...]] = [
        ("HMGET", "k1", "a", "b"),
        ("HMGET", "k2", "a", "b"),
        ("HMGET", "k3", "a", "c"),
        ("SET", b"bin\x00", 3),
        ("PING",),
        ("HMGET", "k4", "a", "é"),
        ("GET", 12),
        ("INCRBYFLOAT", "f", 0.25),
    ]
    reference = b"".join(b"".join(connection.pack_command(*cmd)) for cmd in step)
    assert pack_step(step) == reference


def test_pack_step_rejects_what_redis_cannot_take() -> None:
    with pytest.raises(TypeError):
        pack_step([("SET", "k", None)])


def _redis_py_packing(step: Any) -> bytes:
    import redis.connection

    connection_class: Any = redis.connection.Connection  # redis-py leaves it untyped
    connection = connection_class()
    return b"".join(b"".join(connection.pack_command(*cmd)) for cmd in step)


def test_keyed_commands_pack_like_the_commands_they_stand_for() -> None:
    rng = random.Random(5)
    alphabet = ["a", "7", "-", "é", "日", "\U0001f600", ":"]
    for _ in range(100):
        keys = [
            "".join(rng.choices(alphabet, k=rng.randrange(0, 12))) for _ in range(rng.randrange(6))
        ]
        if rng.random() < 0.1:
            keys.append("k" * rng.choice([1023, 1024, 3000]))  # past the table of bulk headers
        args = tuple(rng.choice(["f1", "é", 3, 0.5, b"raw"]) for _ in range(rng.randrange(4)))
        step = KeyedCommands("HMGET", keys, args)
        commands = [("HMGET", key, *args) for key in keys]
        assert list(step) == commands and len(step) == len(keys)
        assert step[1:3] == commands[1:3]
        assert pack_step(step) == pack_step(commands) == _redis_py_packing(commands)


def test_keyed_commands_with_keys_that_are_not_str_pack_as_the_general_packer() -> None:
    step = KeyedCommands("GET", ["k", b"bin\x00", 7])  # type: ignore[list-item]  # on purpose
    assert pack_step(step) == pack_step(list(step)) == _redis_py_packing(step)
    with pytest.raises(TypeError):
        pack_step(KeyedCommands("GET", ["k", None]))  # type: ignore[list-item]  # on purpose


# Stored values that are not JSON by themselves, some of which a joined parse would take for JSON
# (`"a` and `b"` make one string, `1,2` two numbers), beside JSON values with the characters the
# fast path looks for inside strings.
NASTY: list[bytes | None] = [
    None,
    b'"a',
    b'b"',
    b"1,2",
    b'"x",3',
    b"",
    b" ",
    b"null",
    b" null ",
    b"[1, 2]",
    b"[]",
    b'{"a": 1}',
    b"{}",
    b"typed by hand",
    b"1e400",
    b"NaN",
    b" 3 ",
    b"18446744073709551616",
    _stored("a,b"),
    _stored("[x]"),
    _stored("{y}"),
    _stored("nullable"),
    _stored('quote " and \\ backslash'),
    _stored(-2.5),
    _stored(7),
    _stored(False),
    _stored("c1"),
]


def test_decode_values_is_exact_even_where_a_joined_parse_is_fooled() -> None:
    assert decode_values([b'"a', b'b"', b"1,2"]) == ['"a', 'b"', "1,2"]
    assert decode_values([b'"a,b"', b"1"]) == ["a,b", 1]
    assert decode_values([b"null", None]) == ["null", None]
    rng = random.Random(11)
    for _ in range(3000):
        raw = [rng.choice(NASTY) for _ in range(rng.randrange(0, 8))]
        expected = [None if v is None else decode_value(v) for v in raw]
        assert decode_values(raw) == expected, raw
        assert decode_values(tuple(raw)) == expected, raw


def _rows_by_value(fields: tuple[str, ...], replies: list[list[Any]]) -> FieldRows:
    """The reference: every value through decode_value, cut into rows."""
    flat = [None if v is None else decode_value(v) for reply in replies for v in reply]
    rows = rows_from_values(flat, len(fields))
    return FieldRows(fields, rows[0], rows[1:])


def test_columns_from_replies_hold_the_rows_decode_value_gives() -> None:
    rng = random.Random(12)
    for _ in range(300):
        fields = tuple(f"f{j}" for j in range(rng.randrange(1, 5)))
        replies = [
            [rng.choice(NASTY) if rng.random() < 0.6 else None for _ in fields]
            for _ in range(rng.randrange(1, 12))  # the user's reply, then the candidates'
        ]
        found = columns_from_replies(fields, replies)
        expected = _rows_by_value(fields, replies)
        assert found.rows() == expected
        assert found.size == len(replies) - 1
        assert found.unknown == expected.items.count(None)
        assert FieldColumns.from_rows(expected) == found


def test_field_columns_check_their_shape() -> None:
    with pytest.raises(ValueError):
        FieldColumns(("a", "b"), None, ([1],), 1, 0)
    with pytest.raises(ValueError):
        FieldColumns(("a",), None, ([1, 2],), 1, 0)
    empty = FieldColumns((), None, (), 3, 3)
    assert empty.items == [None, None, None]
    assert FieldColumns.from_rows(FieldRows(("a",), None, [])).columns == ([],)
