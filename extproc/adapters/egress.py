"""Envoy's egress listener as seen by the broker: one keep-alive connection pool per worker (`http1`).

Connection and protocol errors become `MemberUnavailable` (ensemble members) or
`BackendUnreachable` (OIP metadata and readiness) here and nowhere else.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from extproc import wire
from extproc.adapters.http1 import Http1Error, Http1Pool
from extproc.core.ensemble.fanout import MemberReply, MemberUnavailable
from extproc.core.oip import BackendUnreachable

# Concurrent connections to the local Envoy per worker; beyond this, member calls
# queue inside their own time budget instead of opening unbounded sockets.
MAX_CONNECTIONS = 512


class EgressClient:
    """Posts member bodies to Envoy on loopback; no timeouts here, the caller's budget decides."""

    def __init__(self, base_url: str) -> None:
        url = urlsplit(base_url)
        if url.hostname is None or url.port is None:
            raise ValueError(f"egress listener URL needs a host and a port: {base_url!r}")
        # Envoy's answer is the model's: the pool follows no redirects and decodes nothing.
        self._pool = Http1Pool(url.hostname, url.port, MAX_CONNECTIONS)

    async def post(self, path: str, body: bytes, parent_request_id: str) -> MemberReply:
        headers = {"content-type": "application/json", wire.HEADER_PARENT_REQUEST_ID: parent_request_id}
        try:
            resp = await self._pool.request("POST", path, headers, body)
        except (Http1Error, OSError) as exc:
            raise MemberUnavailable(f"egress listener: {exc or type(exc).__name__}") from None
        return MemberReply(
            status=resp.status,
            body=resp.body,
            version=resp.headers.get(wire.HEADER_VERSION, ""),
            request_id=resp.headers.get(wire.HEADER_REQUEST_ID, ""),
        )

    async def get(self, path: str) -> tuple[int, bytes]:
        """An OIP backend's metadata or readiness; the caller's budget decides how long to wait."""
        try:
            resp = await self._pool.request("GET", path, {})
        except (Http1Error, OSError) as exc:
            raise BackendUnreachable(f"egress listener: {exc or type(exc).__name__}") from None
        return resp.status, resp.body

    async def close(self) -> None:
        self._pool.close()
