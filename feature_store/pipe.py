"""A lean pipelined RESP client for the hot paths: one step per round trip, hiredis parsing.

redis-py's asyncio pipeline spends ~5-10 us of Python per command (command objects, one
``read_response`` coroutine per reply); for a request of 500 candidates that is several
milliseconds, ten times what Redis needs to answer 501 HMGETs. :class:`RawPipeline` runs the same
sans-IO flows as :func:`feature_store.store.arun_flow`, but packs a whole step into one buffer
(commands of a step share their frame: ``HMGET <key> f1 f2 ...`` is packed once per step, not
once per key; a :class:`~feature_store.store.KeyedCommands` step is packed from its keys alone)
and lets hiredis parse every reply in C (the replies of a step framed as one array, so one call
returns them all). benchmarks/serving.py measures it against redis-py's pipeline
(``MTL_SERVE_READ_PATH=pipeline``). The stream workers write their live item counters through it
too (:func:`feature_store.counters.counter_client`).

It is deliberately small: plain TCP or a unix socket (``redis://``, ``unix://``), optional AUTH and
SELECT from the URL, RESP2, no TLS, no cluster, no retries. Each exchange runs under one timeout;
a connection that fails, times out or is cancelled mid-exchange is closed, never reused, and the
error surfaces as redis-py's ``ConnectionError`` / ``TimeoutError`` so callers catch one family.
Error replies are redis-py's ``ResponseError`` (``NoScriptError`` for NOSCRIPT). The one repair it
does is :func:`feature_store.store.execute_step`'s: EVALSHA commands answered NOSCRIPT (a
restarted server, SCRIPT FLUSH) are re-sent after a SCRIPT LOAD, in one more round trip.
Replies are hiredis's, not redis-py's conversions: HGETALL is a flat ``[k1, v1, ...]`` list.

Examples
--------
>>> packed = pack_step([("HMGET", "k1", "a"), ("HMGET", "k2", "a")])
>>> packed.split(b"\\r\\n")  # doctest: +NORMALIZE_WHITESPACE
[b'*3', b'$5', b'HMGET', b'$2', b'k1', b'$1', b'a',
 b'*3', b'$5', b'HMGET', b'$2', b'k2', b'$1', b'a', b'']
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Sequence
from itertools import chain, repeat
from typing import Any, TypeVar, cast

import hiredis
from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from feature_store.store import (
    Command,
    Flow,
    KeyedCommands,
    Step,
    merge_reloaded,
    plan_script_reload,
    raise_first_error,
)

__all__ = ["RawPipeline", "pack_step", "reply_error"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_READ_SIZE = 1 << 18


def _arg(value: object) -> bytes:
    """One RESP bulk string."""
    if isinstance(value, bytes):
        raw = value
    elif isinstance(value, str):
        raw = value.encode("utf-8")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        raw = repr(value).encode()
    else:
        raise TypeError(f"cannot send {type(value).__name__} to Redis: {value!r}")
    return b"$%d\r\n%s\r\n" % (len(raw), raw)


def pack_step(step: Sequence[Command]) -> bytes:
    """Pack commands as RESP arrays into one buffer.

    Consecutive commands that differ only in their key (``HMGET <key> f1 f2 ...``) reuse the
    packed name and tail, so a step of 500 HMGETs costs one bytes formatting per key; a
    :class:`~feature_store.store.KeyedCommands` is packed straight from its keys.
    """
    if isinstance(step, KeyedCommands):
        return _pack_keyed(step)
    out: list[bytes] = []
    last_name: object = None
    last_rest: Command | None = None
    head = tail = b""
    for command in step:
        if len(command) < 2:
            out += (b"*%d\r\n" % len(command), *map(_arg, command))
            last_name = None
            continue
        name, key, rest = command[0], command[1], command[2:]
        if name != last_name or rest != last_rest:
            head = b"*%d\r\n" % len(command) + _arg(name)
            tail = b"".join(map(_arg, rest))
            last_name, last_rest = name, rest
        if type(key) is str:  # the hot path: inline the str key
            raw = key.encode("utf-8")
            out.append(b"%s$%d\r\n%s\r\n%s" % (head, len(raw), raw, tail))
        else:
            out += (head, _arg(key), tail)
    return b"".join(out)


# "$<length>\r\n" of every key shorter than 1 KiB, so a key's frame costs no formatting
_BULK_HEADERS = [b"$%d\r\n" % size for size in range(1024)]


def _pack_keyed(step: KeyedCommands) -> bytes:
    """Pack ``(name, key, *args)`` for every key: the frames are joined in C, key by key."""
    try:
        keys = list(map(str.encode, step.keys))
    except TypeError:  # a key that is not a str: the general packer (and its error, if any)
        return pack_step(list(step))
    head = b"*%d\r\n" % (2 + len(step.args)) + _arg(step.name)
    tail = b"\r\n" + b"".join(map(_arg, step.args))  # ends the key, then the arguments
    try:
        headers = list(map(_BULK_HEADERS.__getitem__, map(len, keys)))
    except IndexError:  # a key of 1 KiB or more
        headers = [b"$%d\r\n" % len(key) for key in keys]
    # per key: head, "$<length>\r\n", key, "\r\n" + arguments
    return b"".join(chain.from_iterable(zip(repeat(head), headers, keys, repeat(tail))))


def reply_error(message: str) -> ResponseError:
    """The exception an error reply becomes: ``NoScriptError`` for NOSCRIPT, else ``ResponseError``.

    Examples
    --------
    >>> type(reply_error("NOSCRIPT No matching script")).__name__
    'NoScriptError'
    """
    if message.startswith("NOSCRIPT "):
        return NoScriptError(message)
    return ResponseError(message)


class _Conn:
    """One socket and its reply parser."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = hiredis.Reader(replyError=self._error)
        # error replies in the current exchange: a step without any is returned unscanned
        self.errors = 0

    def _error(self, message: str) -> ResponseError:
        self.errors += 1
        return reply_error(message)

    async def exchange(self, payload: bytes, n_replies: int) -> list[Any]:
        self.errors = 0
        if n_replies < 1:
            return []
        self.writer.write(payload)
        # framed as one RESP array, the step's replies come out of one gets() call, built in C
        self.parser.feed(b"*%d\r\n" % n_replies)
        while True:
            chunk = await self.reader.read(_READ_SIZE)
            if not chunk:
                raise RedisConnectionError("Redis closed the connection")
            self.parser.feed(chunk)
            replies = self.parser.gets()
            if replies is not False:
                return cast(list[Any], replies)

    def close(self) -> None:
        self.writer.close()


class RawPipeline:
    """Runs steps and flows over a small pool of raw connections (see the module docstring)."""

    def __init__(self, url: str, timeout_s: float = 0.25, max_idle: int = 8) -> None:
        params = parse_url(url)
        if "connection_class" in params and "path" not in params:
            raise ValueError(f"RawPipeline supports redis:// and unix:// URLs, not {url!r}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.url = url
        self.timeout_s = timeout_s
        self.max_idle = max_idle
        self._params = params
        self._idle: list[_Conn] = []

    async def _open(self) -> _Conn:
        p = self._params
        if "path" in p:
            reader, writer = await asyncio.open_unix_connection(p["path"])
        else:
            reader, writer = await asyncio.open_connection(p.get("host", "localhost"), p["port"])
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(reader, writer)
        try:
            await self._handshake(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _handshake(self, conn: _Conn) -> None:
        p = self._params
        step: Step = []
        if p.get("password"):
            auth = ("AUTH", p["username"], p["password"]) if p.get("username") else None
            step.append(auth or ("AUTH", p["password"]))
        if p.get("db"):
            step.append(("SELECT", p["db"]))
        if step:
            raise_first_error(await conn.exchange(pack_step(step), len(step)))

    async def execute(self, step: Sequence[Command]) -> list[Any]:
        """Send a step in one round trip and return its replies (raising the first error).

        Only a NOSCRIPT reply costs more: one more round trip loads the scripts and re-sends the
        failed commands (on one connection, so the loads run first).
        """
        if not step:
            return []
        replies, errors = await self._exchange(step)
        if not errors:  # the common case: no pass over hundreds of replies
            return replies
        reload = plan_script_reload(step, replies)
        if reload is None:
            return raise_first_error(replies)
        loads: Step = [("SCRIPT", "LOAD", source) for source in reload.sources]
        retried, _ = await self._exchange(loads + reload.step)
        raise_first_error(retried[: len(loads)])
        return merge_reloaded(replies, reload, retried[len(loads) :])

    async def _exchange(self, step: Sequence[Command]) -> tuple[list[Any], int]:
        """One round trip on a pooled connection: the replies (errors as exceptions), and how
        many error replies there were."""
        conn: _Conn | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
                conn = self._idle.pop() if self._idle else await self._open()
                replies = await conn.exchange(pack_step(step), len(step))
                errors = conn.errors
        except TimeoutError as exc:
            self._discard(conn)
            raise RedisTimeoutError(f"no answer from Redis within {self.timeout_s}s") from exc
        except (OSError, RedisConnectionError) as exc:
            self._discard(conn)
            raise RedisConnectionError(f"Redis connection failed: {exc}") from exc
        except BaseException:  # cancelled mid-exchange: unread replies make it unusable
            self._discard(conn)
            raise
        if len(self._idle) < self.max_idle:
            self._idle.append(conn)
        else:
            conn.close()
        return replies, errors

    def _discard(self, conn: _Conn | None) -> None:
        if conn is not None:
            conn.close()

    async def run(self, flow: Flow[T]) -> T:
        """Drive a sans-IO flow: one pipelined round trip per step."""
        try:
            step = next(flow)
            while True:
                step = flow.send(await self.execute(step))
        except StopIteration as stop:
            result: T = stop.value
            return result

    async def aclose(self) -> None:
        """Close the idle connections."""
        while self._idle:
            conn = self._idle.pop()
            conn.close()
            with contextlib.suppress(OSError):
                await conn.writer.wait_closed()
