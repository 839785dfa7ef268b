"""Envoy's egress listener as seen by the broker: one pooled aiohttp session per worker.

The only module that imports aiohttp in the broker; connection and protocol
errors become `MemberUnavailable` (ensemble members) or `BackendUnreachable`
(OIP metadata and readiness) here and nowhere else.
"""

from __future__ import annotations

import aiohttp

from extproc import wire
from extproc.core.ensemble.fanout import MemberReply, MemberUnavailable
from extproc.core.oip import BackendUnreachable

# Concurrent connections to the local Envoy per worker; beyond this, member calls
# queue inside their own time budget instead of opening unbounded sockets.
MAX_CONNECTIONS = 512


class EgressClient:
    """Posts member bodies to Envoy on loopback; no timeouts here, the caller's budget decides."""

    def __init__(self, base_url: str) -> None:
        self._base = base_url
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS),
            timeout=aiohttp.ClientTimeout(total=None),
            # Envoy's answer is the model's: no cookies, no redirects followed, no decoding games.
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
        )

    async def post(self, path: str, body: bytes, parent_request_id: str) -> MemberReply:
        headers = {"content-type": "application/json", wire.HEADER_PARENT_REQUEST_ID: parent_request_id}
        try:
            async with self._session.post(self._base + path, data=body, headers=headers, allow_redirects=False) as resp:
                return MemberReply(
                    status=resp.status,
                    body=await resp.read(),
                    version=resp.headers.get(wire.HEADER_VERSION, ""),
                    request_id=resp.headers.get(wire.HEADER_REQUEST_ID, ""),
                )
        except (aiohttp.ClientError, OSError) as exc:
            raise MemberUnavailable(f"egress listener: {exc or type(exc).__name__}") from None

    async def get(self, path: str) -> tuple[int, bytes]:
        """An OIP backend's metadata or readiness; the caller's budget decides how long to wait."""
        try:
            async with self._session.get(self._base + path, allow_redirects=False) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, OSError) as exc:
            raise BackendUnreachable(f"egress listener: {exc or type(exc).__name__}") from None

    async def close(self) -> None:
        await self._session.close()
