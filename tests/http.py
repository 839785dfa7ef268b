"""A small client for the data-plane tests: JSON in, (status, headers, JSON) out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

JSON_HEADERS = {"content-type": "application/json"}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any
    raw: bytes

    def error_code(self) -> str:
        """The error code, after checking the reply has the contract's error shape."""
        error = self.body["error"]
        assert set(error) == {"code", "message", "request_id"}, self.body
        assert error["request_id"], self.body
        assert self.headers.get("content-type", "").startswith("application/json"), self.headers
        return str(error["code"])


async def call(
    session: aiohttp.ClientSession,
    url: str,
    body: Any = None,
    *,
    data: bytes | None = None,
    method: str = "POST",
    headers: dict[str, str] | None = None,
) -> Reply:
    payload = data if data is not None else (orjson.dumps(body) if body is not None else None)
    async with session.request(method, url, data=payload, headers=headers or JSON_HEADERS) as resp:
        raw = await resp.read()
        try:
            parsed = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            parsed = None
        return Reply(resp.status, {k.lower(): v for k, v in resp.headers.items()}, parsed, raw)
