"""Entity features in Redis hashes: pure encoding, pipelined batch reads, newest-event-time writes.

A user or item is one hash (:mod:`feature_store.keys`): one field per feature holding its value as
JSON text (``3``, ``0.25``, ``"c7"``, ``true``), plus ``_ts``, the event time in epoch ms of the
newest row applied. A write carrying an older event time than the stored ``_ts`` changes nothing,
so replays and out-of-order loaders cannot roll features back (Feast's ``_ts`` rule).

I/O is kept apart from logic the sans-IO way: an operation is a *flow*, a generator that yields
steps (lists of Redis commands, each step one pipelined round trip) and receives their replies.
:func:`run_flow` drives a flow on a ``redis.Redis``; :func:`arun_flow` on a
``redis.asyncio.Redis``. The sync and async classes are a line per method on top of the same
flows, so reads and writes behave identically in the loaders (sync) and the scorer (async).

The scorer's hot path, :func:`read_columns_flow`, reads only the fields its model uses: one HMGET
per entity, all in one step (a :class:`KeyedCommands`, which the raw runner packs without building
500 commands), and hands back each field's values for all candidates as one column
(:class:`FieldColumns`), the form the scorer encodes. :func:`read_fields_flow` reads the same as
rows (:class:`FieldRows`). The stored values are JSON text already, so a column is decoded with
one ``orjson.loads`` of its values joined into a JSON array instead of one parse per value; a value
that is not JSON (typed by hand in redis-cli) sends its column down :func:`decode_value`, value by
value. :class:`feature_store.pipe.RawPipeline` runs such a step faster than redis-py.

Examples
--------
>>> fields = encode_features({"item_price": 9.5, "item_category": "c7"})
>>> fields
{'item_price': '9.5', 'item_category': '"c7"'}
>>> decode_row({b"item_price": b"9.5", b"item_category": b'"c7"', b"_ts": b"1000"})
FeatureRow(features={'item_price': 9.5, 'item_category': 'c7'}, ts_ms=1000)
"""

from __future__ import annotations

import hashlib
import logging
import math
import numbers
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple, TypeAlias, TypeVar, cast, overload

import orjson
import redis
import redis.asyncio
from redis.exceptions import NoScriptError

from feature_store.errors import InvalidFeatureError
from feature_store.keys import _FORBIDDEN as _FORBIDDEN_IN_KEYS
from feature_store.keys import DEFAULT_NAMESPACE, TS_FIELD, Entity, KeySpace

__all__ = [
    "MERGE_NEWEST",
    "AsyncFeatureStore",
    "Command",
    "FeatureRow",
    "FeatureStore",
    "FeatureValue",
    "FeatureWrite",
    "FieldColumns",
    "FieldRows",
    "Flow",
    "KeyedCommands",
    "LuaScript",
    "RawHash",
    "RequestRows",
    "ScriptReload",
    "Step",
    "aexecute_step",
    "arun_flow",
    "as_keyspace",
    "check_feature_name",
    "check_ts",
    "check_ttl",
    "columns_from_replies",
    "decode_row",
    "decode_value",
    "decode_values",
    "encode_features",
    "encode_value",
    "execute_step",
    "feature_keys",
    "merge_command",
    "merge_reloaded",
    "plan_script_reload",
    "raise_first_error",
    "read_columns_flow",
    "read_fields_flow",
    "read_flow",
    "read_request_flow",
    "rows_from_values",
    "run_flow",
    "surely_valid_parts",
    "text",
    "write_flow",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

FeatureValue: TypeAlias = bool | int | float | str
#: One Redis command as its arguments, e.g. ``("HGETALL", "mtl:feat:user:42")``.
Command: TypeAlias = tuple[Any, ...]
#: Commands sent together in one pipelined round trip; the reply is one result per command.
Step: TypeAlias = list[Command]
#: A sans-IO operation: yields steps, receives their replies, returns its result. A flow may yield
#: any sequence of commands: a :data:`Step`, or a :class:`KeyedCommands`.
Flow: TypeAlias = Generator[Sequence[Command], list[Any], T]
#: An HGETALL reply: bytes or str names and values, as the client's decode_responses has it.
RawHash: TypeAlias = Mapping[Any, bytes | str]

# sha1 -> source of every LuaScript built, so a NOSCRIPT reply (server restarted, SCRIPT FLUSH)
# can be repaired by loading the source and re-sending only the commands that failed.
_SCRIPT_SOURCES: dict[str, str] = {}


@dataclass(frozen=True)
class LuaScript:
    """A server-side script called by sha1 (EVALSHA) inside ordinary pipelines.

    redis-py's ``register_script`` costs an extra SCRIPT EXISTS round trip per pipeline; here the
    runners load a script only when the server answers NOSCRIPT.
    """

    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        sha = hashlib.sha1(self.source.encode("utf-8"), usedforsecurity=False).hexdigest()
        object.__setattr__(self, "sha", sha)
        _SCRIPT_SOURCES[sha] = self.source

    def command(self, keys: Sequence[str], args: Sequence[Any]) -> Command:
        """Build the EVALSHA command calling this script."""
        return ("EVALSHA", self.sha, len(keys), *keys, *args)


# KEYS[1] = hash; ARGV = ts field, event time ms, ttl s (0 = keep), then field/value pairs.
# Applies the row unless the stored event time is strictly newer; ties apply, so a replay of the
# same row is idempotent. Returns 1 when applied, 0 when ignored.
MERGE_NEWEST = LuaScript(
    """
local prev = tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
if prev and prev > tonumber(ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], unpack(ARGV, 4))
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
end
return 1
"""
)


class KeyedCommands(Sequence[Command]):
    """A step of one command sent for many keys: ``(name, key, *args)`` for each key, in order.

    Every runner sends it as that list of commands; :func:`feature_store.pipe.pack_step` packs it
    straight from the keys, without building the commands (the scorer's 501 HMGETs a request).

    Examples
    --------
    >>> step = KeyedCommands("HMGET", ["k1", "k2"], ("a", "b"))
    >>> len(step), step[1], list(step) == [("HMGET", "k1", "a", "b"), ("HMGET", "k2", "a", "b")]
    (2, ('HMGET', 'k2', 'a', 'b'), True)
    """

    def __init__(self, name: str, keys: Sequence[str], args: Sequence[Any] = ()) -> None:
        self.name = name
        self.keys = keys
        self.args = tuple(args)

    def __len__(self) -> int:
        return len(self.keys)

    @overload
    def __getitem__(self, index: int) -> Command: ...

    @overload
    def __getitem__(self, index: slice) -> list[Command]: ...

    def __getitem__(self, index: int | slice) -> Command | list[Command]:
        if isinstance(index, slice):
            return [(self.name, key, *self.args) for key in self.keys[index]]
        return (self.name, self.keys[index], *self.args)

    def __iter__(self) -> Iterator[Command]:
        name, args = self.name, self.args
        return ((name, key, *args) for key in self.keys)

    def __repr__(self) -> str:
        return f"KeyedCommands({self.name!r}, <{len(self.keys)} keys>, {self.args!r})"


# --- runners: the only code that talks to Redis -------------------------------------------------


class ScriptReload(NamedTuple):
    """What to repair after NOSCRIPT replies: sources to load and the commands to re-send."""

    sources: list[str]
    indices: list[int]
    step: Step


def plan_script_reload(step: Sequence[Command], results: list[Any]) -> ScriptReload | None:
    """Plan the repair of a step whose EVALSHA commands got NOSCRIPT, or ``None`` if none did.

    ``results`` holds the step's replies with error replies as exception instances; a NOSCRIPT
    reply must be a ``redis.exceptions.NoScriptError`` (as redis-py and RawPipeline give it).
    """
    indices = [i for i, res in enumerate(results) if isinstance(res, NoScriptError)]
    if not indices:
        return None
    shas = sorted({step[i][1] for i in indices})
    logger.info("loading %d lua script(s) after NOSCRIPT", len(shas))
    return ScriptReload([_SCRIPT_SOURCES[s] for s in shas], indices, [step[i] for i in indices])


def merge_reloaded(results: list[Any], reload: ScriptReload, retried: list[Any]) -> list[Any]:
    """Put the re-sent commands' replies in place, then raise the first error if any."""
    for i, res in zip(reload.indices, retried, strict=True):
        results[i] = res
    return raise_first_error(results)


def raise_first_error(results: list[Any]) -> list[Any]:
    """Return a step's replies, or raise the first error reply among them."""
    for res in results:
        if isinstance(res, Exception):
            raise res
    return results


def _send(client: redis.Redis, step: Sequence[Command]) -> list[Any]:
    with client.pipeline(transaction=False) as pipe:
        # redis-py leaves the sync Pipeline.execute_command untyped; it only queues the command
        queue: Callable[..., object] = pipe.execute_command
        for command in step:
            queue(*command)
        return pipe.execute(raise_on_error=False)


async def _asend(client: redis.asyncio.Redis, step: Sequence[Command]) -> list[Any]:
    async with client.pipeline(transaction=False) as pipe:
        for command in step:
            pipe.execute_command(*command)
        return await pipe.execute(raise_on_error=False)


def execute_step(client: redis.Redis, step: Sequence[Command]) -> list[Any]:
    """Send one step in one pipelined round trip and return its replies (first error raised).

    Only a NOSCRIPT reply costs more: the script is loaded and the failed commands re-sent.
    """
    if not step:
        return []
    results = _send(client, step)
    reload = plan_script_reload(step, results)
    if reload is None:
        return raise_first_error(results)
    for source in reload.sources:
        client.script_load(source)
    return merge_reloaded(results, reload, _send(client, reload.step))


async def aexecute_step(client: redis.asyncio.Redis, step: Sequence[Command]) -> list[Any]:
    """Async :func:`execute_step`."""
    if not step:
        return []
    results = await _asend(client, step)
    reload = plan_script_reload(step, results)
    if reload is None:
        return raise_first_error(results)
    for source in reload.sources:
        await client.script_load(source)
    return merge_reloaded(results, reload, await _asend(client, reload.step))


def run_flow(client: redis.Redis, flow: Flow[T]) -> T:
    """Drive a flow on a sync client: one pipelined round trip per step."""
    try:
        step = next(flow)
        while True:
            step = flow.send(execute_step(client, step))
    except StopIteration as stop:
        result: T = stop.value
        return result


async def arun_flow(client: redis.asyncio.Redis, flow: Flow[T]) -> T:
    """Drive a flow on an asyncio client: one pipelined round trip per step."""
    try:
        step = next(flow)
        while True:
            step = flow.send(await aexecute_step(client, step))
    except StopIteration as stop:
        result: T = stop.value
        return result


# --- pure encoding ------------------------------------------------------------------------------


def text(raw: bytes | str) -> str:
    """Return a reply as str whether the client decodes responses or not."""
    return raw.decode("utf-8") if isinstance(raw, bytes) else raw


def encode_value(value: object, name: str = "feature") -> str:
    """Encode one feature value as JSON text; numbers must be finite, strings any text.

    Examples
    --------
    >>> encode_value(3), encode_value(0.5), encode_value("s3"), encode_value(True)
    ('3', '0.5', '"s3"', 'true')
    """
    if isinstance(value, bool | str):
        return orjson.dumps(value).decode("utf-8")
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        number = float(value)
        if not math.isfinite(number):
            raise InvalidFeatureError(f"{name}={value!r}: numbers must be finite")
        return repr(number)
    raise InvalidFeatureError(f"{name}={value!r}: expected bool, int, float or str")


_SCALARS = (bool, int, float, str)


def decode_value(raw: bytes | str) -> FeatureValue:
    """Decode one stored value; text that is not JSON (typed by hand in redis-cli) stays text.

    Examples
    --------
    >>> decode_value(b"0.25"), decode_value(b'"c7"'), decode_value(b"s3")
    (0.25, 'c7', 's3')
    """
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return text(raw)
    if isinstance(value, _SCALARS):
        return value
    return text(raw)  # a JSON list/object/null is no feature value: keep what was written


def check_feature_name(name: object) -> str:
    """Return ``name`` if it can be a feature field (a non-empty str not starting with ``_``)."""
    if not isinstance(name, str) or not name:
        raise InvalidFeatureError(f"feature names must be non-empty str, got {name!r}")
    if name.startswith("_"):
        raise InvalidFeatureError(f"feature name {name!r}: names starting with '_' are reserved")
    return name


def encode_features(features: Mapping[str, object]) -> dict[str, str]:
    """Encode a feature dict to hash fields (metadata fields are added by the writer)."""
    return {check_feature_name(k): encode_value(v, k) for k, v in features.items()}


def check_ts(ts_ms: object) -> int:
    """Return ``ts_ms`` if it is a non-negative int of epoch milliseconds, else raise."""
    if isinstance(ts_ms, bool) or not isinstance(ts_ms, int) or ts_ms < 0:
        raise ValueError(f"event time must be a non-negative int of epoch ms, got {ts_ms!r}")
    return ts_ms


def check_ttl(ttl_s: int | None) -> int:
    """Return the TTL argument of the merge script: seconds, or 0 for none."""
    if ttl_s is None:
        return 0
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or ttl_s < 1:
        raise ValueError(f"ttl_s must be None or a positive int of seconds, got {ttl_s!r}")
    return ttl_s


@dataclass(frozen=True)
class FeatureRow:
    """One entity's features as read back: values by name, and the event time of the newest row."""

    features: dict[str, FeatureValue]
    # event time (epoch ms) of the newest applied row; None when the hash has no `_ts`
    ts_ms: int | None


def decode_row(raw: RawHash) -> FeatureRow | None:
    """Decode an HGETALL reply; ``None`` for a missing entity (empty reply)."""
    if not raw:
        return None
    features: dict[str, FeatureValue] = {}
    ts_ms: int | None = None
    # the scorer decodes ~500 rows per request: keep this loop lean
    for key, value in raw.items():
        name = key.decode("utf-8") if isinstance(key, bytes) else key
        if name[:1] != "_":
            features[name] = decode_value(value)
        elif name == TS_FIELD:
            ts_ms = int(value)
    return FeatureRow(features, ts_ms)


def merge_command(
    key: str,
    fields: Mapping[str, str],
    ts_ms: int,
    ttl_s: int | None = None,
    ts_field: str = TS_FIELD,
) -> Command:
    """Build the command applying encoded ``fields`` to ``key`` unless a newer row is stored."""
    args: list[Any] = [ts_field, check_ts(ts_ms), check_ttl(ttl_s)]
    for name, value in fields.items():
        args += (name, value)
    return MERGE_NEWEST.command([key], args)


# --- flows --------------------------------------------------------------------------------------


class FeatureWrite(NamedTuple):
    """One row to write: entity id, feature values, event time (epoch ms)."""

    entity_id: str
    features: Mapping[str, object]
    ts_ms: int


class RequestRows(NamedTuple):
    """Features for one ranking request: the user's row and one row per candidate, in order."""

    user: FeatureRow | None
    items: list[FeatureRow | None]


def read_flow(keys: KeySpace, entity: Entity, ids: Sequence[str]) -> Flow[list[FeatureRow | None]]:
    """Read many entities in one round trip; rows in input order, ``None`` where missing."""
    replies = yield [("HGETALL", keys.features(entity, i)) for i in ids]
    return [decode_row(reply) for reply in replies]


def read_request_flow(keys: KeySpace, user_id: str, item_ids: Sequence[str]) -> Flow[RequestRows]:
    """Read the user and every candidate item in one round trip."""
    step = [("HGETALL", keys.user_features(user_id))]
    step += [("HGETALL", keys.item_features(i)) for i in item_ids]
    replies = yield step
    return RequestRows(decode_row(replies[0]), [decode_row(r) for r in replies[1:]])


class FieldRows(NamedTuple):
    """Selected fields of a user and its candidates, values aligned with ``fields``.

    A row is ``None`` when none of the fields is stored (an unknown entity, or one that has none
    of these features); inside a row, ``None`` marks one absent field.
    """

    fields: tuple[str, ...]
    user: list[FeatureValue | None] | None
    items: list[list[FeatureValue | None] | None]


@dataclass(frozen=True)
class FieldColumns:
    """Selected fields of a user and its candidates, the candidates' values one list per field.

    The scorer's form of :class:`FieldRows` (:func:`read_columns_flow`): its encoder takes a
    field's values for every candidate at once. ``user`` is as in FieldRows; ``columns[j][i]`` is
    candidate ``i``'s value of ``fields[j]`` (``None``: absent); ``size`` counts the candidates and
    ``unknown`` those with none of the fields stored. :attr:`items` gives FieldRows' rows.

    Examples
    --------
    >>> found = FieldColumns(("seg", "price"), None, (["s1", None], [2.5, None]), 2, 1)
    >>> found.items
    [['s1', 2.5], None]
    >>> FieldColumns.from_rows(found.rows()) == found
    True
    """

    fields: tuple[str, ...]
    user: list[FeatureValue | None] | None
    columns: tuple[list[FeatureValue | None], ...]
    size: int
    unknown: int

    def __post_init__(self) -> None:
        if len(self.columns) != len(self.fields):
            raise ValueError(f"{len(self.columns)} columns for {len(self.fields)} fields")
        if any(len(column) != self.size for column in self.columns):
            raise ValueError(f"every column must hold {self.size} values")

    @classmethod
    def from_rows(cls, found: FieldRows) -> FieldColumns:
        """The columns of rows (the reads that get whole hashes, the item cache)."""
        absent = [None] * len(found.fields)
        rows = [absent if row is None else row for row in found.items]
        if rows and found.fields:
            columns = tuple(map(list, zip(*rows, strict=True)))
        else:
            columns = tuple([None] * len(rows) for _ in found.fields)
        return cls(found.fields, found.user, columns, len(rows), found.items.count(None))

    @cached_property
    def items(self) -> list[list[FeatureValue | None] | None]:
        """The candidates' rows as in :class:`FieldRows`, built on first use (the impression
        log's, off the request path)."""
        if not self.columns:
            return [None] * self.size
        absent = (None,) * len(self.columns)
        rows = zip(*self.columns, strict=True)
        return [None if row == absent else list(row) for row in rows]

    def rows(self) -> FieldRows:
        """The same values as :class:`FieldRows`."""
        return FieldRows(self.fields, self.user, self.items)


_SCALAR_TYPES = frozenset({bool, int, float, str, type(None)})


def rows_from_values(values: Sequence[FeatureValue | None], width: int) -> list[Any]:
    """Cut a key-major flat list into rows of ``width`` values; all-``None`` rows become ``None``.

    Examples
    --------
    >>> rows_from_values([1, None, None, None, "a", 2.5], 2)
    [[1, None], None, ['a', 2.5]]
    """
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    rows: list[Any] = []
    for start in range(0, len(values), width):
        row = list(values[start : start + width])
        rows.append(row if row.count(None) < width else None)
    return rows


def surely_valid_parts(values: Sequence[object], max_bytes: int) -> bool:
    """Whether every value is certainly a valid key part, checked on all of them at once.

    A conservative shortcut for hundreds of ids: True only for non-empty printable strs without a
    forbidden character, short enough that even 4 UTF-8 bytes per char fit ``max_bytes``. False
    means "check them one by one with :func:`check_part`", which names the problem, if any.

    Examples
    --------
    >>> surely_valid_parts(["i1", "i2"], 256), surely_valid_parts(["i1", "a:b"], 256)
    (True, False)
    """
    if not values:
        return False
    strs = cast(Sequence[str], values)
    try:
        joined = "".join(strs)
    except TypeError:  # not all strs
        return False
    return (
        "" not in strs
        and max(map(len, strs)) * 4 <= max_bytes
        and joined.isprintable()
        and _FORBIDDEN_IN_KEYS.search(joined) is None
    )


def feature_keys(keys: KeySpace, entity: Entity, ids: Sequence[str]) -> list[str]:
    """Keys of many entities' hashes, exactly ``[keys.features(entity, i) for i in ids]``.

    Checking 500 ids one by one costs more than reading them from Redis, so they are checked
    at once (:func:`surely_valid_parts`), falling back to one by one (and its error).

    Examples
    --------
    >>> feature_keys(KeySpace(), "item", ["i1", "i2"])
    ['mtl:feat:item:i1', 'mtl:feat:item:i2']
    """
    if surely_valid_parts(ids, keys.max_part_bytes):
        prefix = keys.features(entity, "_")[:-1]  # the layout stays defined in keys.py
        return [prefix + i for i in ids]
    return [keys.features(entity, i) for i in ids]


def _field_names(fields: Sequence[str]) -> tuple[str, ...]:
    names = tuple(check_feature_name(f) for f in fields)
    if not names:
        raise ValueError("a fields read needs at least one field")
    return names


def read_fields_flow(
    keys: KeySpace, user_id: str, item_ids: Sequence[str], fields: Sequence[str]
) -> Flow[FieldRows]:
    """Read ``fields`` of the user and every candidate in one round trip (one HMGET each).

    Values decode as :func:`decode_value` would; the common case (every value JSON text, as the
    writers store them) costs one ``orjson.loads`` for the whole request.
    """
    names = _field_names(fields)
    step: Step = [("HMGET", keys.user_features(user_id), *names)]
    step += [("HMGET", key, *names) for key in feature_keys(keys, "item", item_ids)]
    replies = yield step
    values = decode_values([value for reply in replies for value in reply])
    rows = rows_from_values(values, len(names))
    return FieldRows(names, rows[0], rows[1:])


def read_columns_flow(
    keys: KeySpace, user_id: str, item_ids: Sequence[str], fields: Sequence[str]
) -> Flow[FieldColumns]:
    """Read what :func:`read_fields_flow` reads, as columns (:class:`FieldColumns`).

    The same HMGETs, sent as one :class:`KeyedCommands`; each column is decoded on its own
    (:func:`columns_from_replies`), so a value typed by hand slows down its column only.
    """
    names = _field_names(fields)
    item_keys = feature_keys(keys, "item", item_ids)
    replies = yield KeyedCommands("HMGET", [keys.user_features(user_id), *item_keys], names)
    return columns_from_replies(names, replies)


def columns_from_replies(fields: tuple[str, ...], replies: Sequence[Any]) -> FieldColumns:
    """Decode the HMGET replies of the user, then of each candidate, into :class:`FieldColumns`.

    Examples
    --------
    >>> replies = [[b'"s1"', None], [None, b"2.5"], [None, None]]
    >>> found = columns_from_replies(("seg", "price"), replies)
    >>> found.user, found.columns, found.unknown
    (['s1', None], ([None, None], [2.5, None]), 1)
    """
    width = len(fields)
    user = decode_values(replies[0])
    items = replies[1:]
    if items:
        # zip(*) turns 500 replies into `width` columns in C
        columns = tuple(decode_values(column) for column in zip(*items, strict=True))
    else:
        columns = tuple([] for _ in fields)
    unknown = items.count([None] * width)  # hiredis and redis-py answer HMGET with a list
    return FieldColumns(
        fields, user if user.count(None) < width else None, columns, len(items), unknown
    )


_NULL = b"null"


def decode_values(raw: Sequence[bytes | str | None]) -> list[FeatureValue | None]:
    """Decode many stored values (``None`` = absent) at once, as :func:`decode_value` would.

    One ``orjson.loads`` of the values joined into an array, unless a value spoils it (not JSON,
    a JSON list/object or null, a comma inside): then value by value.

    Examples
    --------
    >>> decode_values([b"1.5", None, b'"c7"', b"typed-by-hand"])
    [1.5, None, 'c7', 'typed-by-hand']
    """
    absent = raw.count(None)
    if absent == len(raw):  # a field no candidate has (a user feature, read for every item)
        return [None] * absent
    try:
        # a str reply (a client with decode_responses) makes the join raise TypeError
        parts: list[Any] = [_NULL if v is None else v for v in raw]
        body = b",".join(parts)
        values: list[FeatureValue | None] = orjson.loads(b"[" + body + b"]")
    except (TypeError, orjson.JSONDecodeError):
        return [None if v is None else decode_value(v) for v in raw]
    if not _each_value_parsed_alone(body, values, len(raw), absent):
        return [None if v is None else decode_value(v) for v in raw]
    return values


def _each_value_parsed_alone(body: bytes, values: list[Any], n: int, absent: int) -> bool:
    """Whether the joined parse gave each value what :func:`decode_value` gives it alone.

    A value that is not JSON by itself can still parse once joined (``"a`` and ``b"`` make one
    string, ``1,2`` two numbers), so this is checked on the bytes: ``n`` elements are separated
    by ``n - 1`` commas, and when the body holds no commas but the ``n - 1`` put between the
    values, those are the separators, so each element is exactly one value. A value with a comma
    inside (``"a,b"``) takes the slow path.
    """
    return (
        len(values) == n
        and body.count(b",") == n - 1
        # only our placeholders decode to None (a stored JSON null stays text)
        and body.count(_NULL) == absent
        # scalars only: a JSON list or object stays text; no bracket at all means no container
        and ((b"[" not in body and b"{" not in body) or _SCALAR_TYPES.issuperset(map(type, values)))
    )


def write_flow(
    keys: KeySpace,
    entity: Entity,
    rows: Iterable[FeatureWrite | tuple[str, Mapping[str, object], int]],
    ttl_s: int | None = None,
) -> Flow[int]:
    """Write rows in one round trip, each kept only if not older than the stored one.

    Returns the number of rows applied. Every row is validated before anything is sent, so a bad
    row fails the batch without a partial write.
    """
    step = [
        merge_command(keys.features(entity, row[0]), encode_features(row[1]), row[2], ttl_s)
        for row in rows
    ]
    replies = yield step
    return sum(int(r) for r in replies)


# --- clients ------------------------------------------------------------------------------------


def as_keyspace(namespace: str | KeySpace) -> KeySpace:
    """Accept a namespace prefix or a ready :class:`KeySpace`."""
    return namespace if isinstance(namespace, KeySpace) else KeySpace(namespace)


class FeatureStore:
    """Features over a sync ``redis.Redis`` (loaders, tools)."""

    def __init__(self, client: redis.Redis, namespace: str | KeySpace = DEFAULT_NAMESPACE) -> None:
        self.client = client
        self.keys = as_keyspace(namespace)

    def read(self, entity: Entity, ids: Sequence[str]) -> list[FeatureRow | None]:
        """Read entities in one round trip, in input order, ``None`` for missing ones."""
        return run_flow(self.client, read_flow(self.keys, entity, ids))

    def read_request(self, user_id: str, item_ids: Sequence[str]) -> RequestRows:
        """Read a user and all candidate items in one round trip."""
        return run_flow(self.client, read_request_flow(self.keys, user_id, item_ids))

    def read_fields(
        self, user_id: str, item_ids: Sequence[str], fields: Sequence[str]
    ) -> FieldRows:
        """Read only ``fields`` of a user and all candidate items in one round trip."""
        return run_flow(self.client, read_fields_flow(self.keys, user_id, item_ids, fields))

    def write(
        self,
        entity: Entity,
        rows: Iterable[FeatureWrite | tuple[str, Mapping[str, object], int]],
        ttl_s: int | None = None,
    ) -> int:
        """Write rows in one round trip, newest event time wins; returns how many applied."""
        return run_flow(self.client, write_flow(self.keys, entity, rows, ttl_s))


class AsyncFeatureStore:
    """Features over a ``redis.asyncio.Redis`` (the scorer, the stream worker)."""

    def __init__(
        self, client: redis.asyncio.Redis, namespace: str | KeySpace = DEFAULT_NAMESPACE
    ) -> None:
        self.client = client
        self.keys = as_keyspace(namespace)

    async def read(self, entity: Entity, ids: Sequence[str]) -> list[FeatureRow | None]:
        """Read entities in one round trip, in input order, ``None`` for missing ones."""
        return await arun_flow(self.client, read_flow(self.keys, entity, ids))

    async def read_request(self, user_id: str, item_ids: Sequence[str]) -> RequestRows:
        """Read a user and all candidate items in one round trip."""
        return await arun_flow(self.client, read_request_flow(self.keys, user_id, item_ids))

    async def read_fields(
        self, user_id: str, item_ids: Sequence[str], fields: Sequence[str]
    ) -> FieldRows:
        """Read only ``fields`` of a user and all candidate items in one round trip."""
        return await arun_flow(self.client, read_fields_flow(self.keys, user_id, item_ids, fields))

    async def write(
        self,
        entity: Entity,
        rows: Iterable[FeatureWrite | tuple[str, Mapping[str, object], int]],
        ttl_s: int | None = None,
    ) -> int:
        """Write rows in one round trip, newest event time wins; returns how many applied."""
        return await arun_flow(self.client, write_flow(self.keys, entity, rows, ttl_s))
