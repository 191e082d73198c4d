"""Parse and validate ranking requests: pure functions from body bytes to a `RankRequest`.

Unknown top-level JSON fields are ignored, not rejected, so older scorers accept requests from
newer clients; their names come back in the ``X-Ignored-Fields`` response header so a typo
(``"top-k"``) is still visible.

Examples
--------
>>> limits = RequestLimits(max_candidates=10)
>>> req = parse_rank_request(b'{"user_id": "u1", "candidates": ["i1", "i2"], "x": 1}', limits)
>>> req.user_id, req.candidates, req.top_k, req.ignored
('u1', ['i1', 'i2'], None, ('x',))
>>> parse_rank_request(b'{"user_id": "u1", "candidates": []}', limits)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
serving.errors.RequestError: candidates is empty: send at least one item id
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from feature_store.errors import InvalidKeyPartError
from feature_store.keys import MAX_PART_BYTES, check_part
from feature_store.store import surely_valid_parts
from serving.errors import RequestError

__all__ = ["KNOWN_FIELDS", "RankRequest", "RequestLimits", "parse_rank_request"]

#: Top-level fields of a ranking request; any other field is ignored and reported.
KNOWN_FIELDS = frozenset({"user_id", "candidates", "context", "top_k"})


@dataclass(frozen=True)
class RequestLimits:
    """What a ranking request may hold; beyond it the scorer answers 413 or 422."""

    max_candidates: int = 1000  # candidate ids per request
    max_id_bytes: int = MAX_PART_BYTES  # UTF-8 bytes per user or item id
    max_body_bytes: int = 1 << 20  # request body
    max_context_bytes: int = 4096  # the context object, as compact JSON


@dataclass(frozen=True)
class RankRequest:
    """A validated ``POST /v1/rank`` body."""

    user_id: str
    candidates: list[str]
    context: dict[str, Any] = field(default_factory=dict)
    # how many items to return (best first); None = all candidates
    top_k: int | None = None
    # unknown top-level fields, ignored
    ignored: tuple[str, ...] = ()


def _unprocessable(code: str, message: str, where: str | None) -> RequestError:
    return RequestError(422, code, message, where)


def _check_id(value: object, where: str, max_bytes: int) -> str:
    if not isinstance(value, str):
        raise _unprocessable("wrong_type", f"{where} must be a string", where)
    try:
        return check_part(value, where, max_bytes)
    except InvalidKeyPartError as exc:
        raise _unprocessable("invalid_id", str(exc), where) from exc


def _candidates(value: object, limits: RequestLimits) -> list[str]:
    if not isinstance(value, list):
        raise _unprocessable("wrong_type", "candidates must be a list of item ids", "candidates")
    if not value:
        raise _unprocessable(
            "empty_candidates", "candidates is empty: send at least one item id", "candidates"
        )
    if len(value) > limits.max_candidates:
        raise _unprocessable(
            "too_many_candidates",
            f"{len(value)} candidates, over the limit of {limits.max_candidates}",
            "candidates",
        )
    if not surely_valid_parts(value, limits.max_id_bytes):  # else one by one, naming the bad one
        for i, item in enumerate(value):
            _check_id(item, f"candidates[{i}]", limits.max_id_bytes)
    return value


def _context(value: object, limits: RequestLimits) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _unprocessable("wrong_type", "context must be a JSON object", "context")
    size = len(orjson.dumps(value))
    if size > limits.max_context_bytes:
        raise _unprocessable(
            "context_too_large",
            f"context is {size} bytes of JSON, over the limit of {limits.max_context_bytes}",
            "context",
        )
    return value


def _top_k(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _unprocessable("wrong_type", "top_k must be an integer", "top_k")
    if value < 1:
        raise _unprocessable("invalid_top_k", f"top_k must be >= 1, got {value}", "top_k")
    return value


def _decode(body: bytes, limits: RequestLimits) -> Mapping[str, Any]:
    if len(body) > limits.max_body_bytes:
        raise RequestError(
            413,
            "body_too_large",
            f"request body is {len(body)} bytes, over the limit of {limits.max_body_bytes}",
        )
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(400, "malformed_json", f"request body is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise _unprocessable("wrong_type", "request body must be a JSON object", None)
    return obj


def parse_rank_request(body: bytes, limits: RequestLimits) -> RankRequest:
    """Parse a ranking request body, raising :class:`RequestError` (4xx) on any problem."""
    obj = _decode(body, limits)
    for name in ("user_id", "candidates"):
        if name not in obj:
            raise _unprocessable("missing_field", f"{name} is required", name)
    return RankRequest(
        user_id=_check_id(obj["user_id"], "user_id", limits.max_id_bytes),
        candidates=_candidates(obj["candidates"], limits),
        context=_context(obj.get("context"), limits),
        top_k=_top_k(obj.get("top_k")),
        ignored=tuple(sorted(k for k in obj if k not in KNOWN_FIELDS)),
    )
