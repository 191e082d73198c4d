"""Validation of POST /v1/rank bodies: each problem is a clear 4xx with a code and a field."""

from __future__ import annotations

import orjson
import pytest

from serving.errors import RequestError
from serving.request import RequestLimits, parse_rank_request

LIMITS = RequestLimits(max_candidates=5, max_id_bytes=16, max_body_bytes=2000, max_context_bytes=64)


def _parse(body: object) -> object:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return parse_rank_request(raw, LIMITS)


def _error(body: object) -> RequestError:
    with pytest.raises(RequestError) as info:
        _parse(body)
    return info.value


def test_a_valid_request_parses_with_defaults() -> None:
    req = parse_rank_request(b'{"user_id": "u1", "candidates": ["a", "b"]}', LIMITS)
    assert (req.user_id, req.candidates, req.context, req.top_k, req.ignored) == (
        "u1",
        ["a", "b"],
        {},
        None,
        (),
    )
    full = {"user_id": "u", "candidates": ["a"], "context": {"hour": 3}, "top_k": 1}
    assert parse_rank_request(orjson.dumps(full), LIMITS).top_k == 1


def test_unknown_fields_are_ignored_and_listed() -> None:
    req = parse_rank_request(b'{"user_id": "u", "candidates": ["a"], "zz": 1, "top-k": 2}', LIMITS)
    assert req.ignored == ("top-k", "zz")


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        (b'{"user_id": "u", "candidates": [', 400, "malformed_json", None),
        (b"", 400, "malformed_json", None),
        (b"x" * 2001, 413, "body_too_large", None),
        ([1, 2], 422, "wrong_type", None),
        ({"candidates": ["a"]}, 422, "missing_field", "user_id"),
        ({"user_id": "u"}, 422, "missing_field", "candidates"),
        ({"user_id": 7, "candidates": ["a"]}, 422, "wrong_type", "user_id"),
        ({"user_id": "u", "candidates": "a"}, 422, "wrong_type", "candidates"),
        ({"user_id": "u", "candidates": []}, 422, "empty_candidates", "candidates"),
        ({"user_id": "u", "candidates": list("abcdef")}, 422, "too_many_candidates", "candidates"),
        ({"user_id": "u", "candidates": ["a", 3]}, 422, "wrong_type", "candidates[1]"),
        ({"user_id": "u", "candidates": ["a", "x" * 17]}, 422, "invalid_id", "candidates[1]"),
        ({"user_id": "u", "candidates": ["a:b"]}, 422, "invalid_id", "candidates[0]"),
        ({"user_id": "", "candidates": ["a"]}, 422, "invalid_id", "user_id"),
        ({"user_id": "u", "candidates": ["a"], "context": [1]}, 422, "wrong_type", "context"),
        (
            {"user_id": "u", "candidates": ["a"], "context": {"k": "v" * 80}},
            422,
            "context_too_large",
            "context",
        ),
        ({"user_id": "u", "candidates": ["a"], "top_k": "2"}, 422, "wrong_type", "top_k"),
        ({"user_id": "u", "candidates": ["a"], "top_k": True}, 422, "wrong_type", "top_k"),
        ({"user_id": "u", "candidates": ["a"], "top_k": 0}, 422, "invalid_top_k", "top_k"),
    ],
)
def test_invalid_requests_get_a_status_code_and_field(
    body: object, status: int, code: str, field: str | None
) -> None:
    error = _error(body)
    assert (error.status, error.code, error.field) == (status, code, field)
    assert error.message
    assert error.to_dict() == {"error": {"code": code, "message": error.message, "field": field}}


def test_parsing_does_not_mutate_or_reorder_candidates() -> None:
    cands = ["c", "a", "b", "a"]  # duplicates are allowed and scored each
    body = orjson.dumps({"user_id": "u", "candidates": cands})
    assert parse_rank_request(body, LIMITS).candidates == ["c", "a", "b", "a"]
