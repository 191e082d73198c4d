"""A small synchronous client of the scorer (httpx, keep-alive).

Usage (against a running scorer; exercised by tests/integration/test_serving.py)::

    with RankClient("http://127.0.0.1:8000") as client:
        result = client.rank("u1", ["i1", "i2", "i3"], top_k=2)
        top = [item.item_id for item in result.items]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx
import orjson

from serving.errors import ServingError

__all__ = ["RankClient", "RankError", "RankResult", "RankedItem"]


class RankError(ServingError):
    """The scorer answered a ranking request with an error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class RankedItem:
    """One ranked candidate: fused score and per-task predictions."""

    item_id: str
    score: float
    tasks: dict[str, float]


@dataclass(frozen=True)
class RankResult:
    """A ranking answer, best item first."""

    model_version: int
    items: list[RankedItem]
    request_id: str
    # unknown request fields the scorer ignored (X-Ignored-Fields)
    ignored: tuple[str, ...] = ()
    # True when Redis was unavailable and default features were used
    degraded: bool = False


def _error(response: httpx.Response) -> RankError:
    try:
        error = orjson.loads(response.content)["error"]
        return RankError(response.status_code, str(error["code"]), str(error["message"]))
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return RankError(response.status_code, "http_error", response.text[:200])


class RankClient:
    """Calls ``POST /v1/rank``, ``GET /health`` and ``GET /v1/model`` of one scorer."""

    def __init__(
        self, url: str = "http://127.0.0.1:8000", timeout_s: float = 5.0, **httpx_args: Any
    ) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s, **httpx_args)

    def rank(
        self,
        user_id: str,
        candidates: Sequence[str],
        context: Mapping[str, Any] | None = None,
        top_k: int | None = None,
        request_id: str | None = None,
    ) -> RankResult:
        """Rank ``candidates`` for ``user_id``; raises :class:`RankError` on an error answer."""
        body: dict[str, Any] = {"user_id": user_id, "candidates": list(candidates)}
        if context is not None:
            body["context"] = dict(context)
        if top_k is not None:
            body["top_k"] = top_k
        headers = {"content-type": "application/json"}
        if request_id is not None:
            headers["x-request-id"] = request_id
        response = self._http.post("/v1/rank", content=orjson.dumps(body), headers=headers)
        if response.status_code != 200:
            raise _error(response)
        data = orjson.loads(response.content)
        ignored = response.headers.get("x-ignored-fields", "")
        return RankResult(
            model_version=int(data["model_version"]),
            items=[RankedItem(i["item_id"], i["score"], i["tasks"]) for i in data["items"]],
            request_id=response.headers.get("x-request-id", ""),
            ignored=tuple(f for f in ignored.split(",") if f),
            degraded="x-degraded" in response.headers,
        )

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Return ``(healthy, body)`` of ``GET /health``."""
        response = self._http.get("/health")
        body: dict[str, Any] = orjson.loads(response.content)
        return response.status_code == 200, body

    def model(self) -> dict[str, Any]:
        """Return ``GET /v1/model`` (raises :class:`RankError` before a model is loaded)."""
        response = self._http.get("/v1/model")
        if response.status_code != 200:
            raise _error(response)
        body: dict[str, Any] = orjson.loads(response.content)
        return body

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> RankClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
