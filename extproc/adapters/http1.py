"""A keep-alive HTTP/1.1 client for one peer on this host: Envoy's egress listener.

Ensemble members and OIP metadata are calls to the local Envoy over loopback,
where none of a general client's features (redirects, cookies, proxies, TLS,
decompression) apply. aiohttp's client spent more CPU per member call than the
rest of the ensemble path; this one is httptools (llhttp) on asyncio
Protocols, as the broker's own `http_service` server is. Connections are
reused one request at a time; a connection whose request failed or was
cancelled is closed, since its state is unknown.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import httptools


class Http1Error(Exception):
    """No complete HTTP answer on the connection: refused, reset, closed early, or not HTTP."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    # Names in lower case; a repeated header keeps its last value.
    headers: dict[str, str]
    body: bytes


class _Connection(asyncio.Protocol):
    """One connection to the peer: at most one request in flight."""

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[Response] | None = None
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self.reusable = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self._transport = None
        self._fail(Http1Error(f"connection closed before the answer was complete ({exc or 'EOF'})"))

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(Http1Error(f"not an HTTP answer: {exc}"))
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        response = Response(self._parser.get_status_code(), self._headers, b"".join(self._body))
        self._headers, self._body = {}, []
        if not self._parser.should_keep_alive():
            self.reusable = False
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    def _fail(self, error: Http1Error) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    async def exchange(self, request: bytes) -> Response:
        if self._transport is None or self._transport.is_closing():
            raise Http1Error("connection closed")
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(request)
        return await self._waiter

    def close(self) -> None:
        self.reusable = False
        if self._transport is not None:
            self._transport.close()


class Http1Pool:
    """Requests to `host:port`, over at most `limit` connections kept open between requests."""

    def __init__(self, host: str, port: int, limit: int) -> None:
        self._host, self._port = host, port
        self._authority = f"{host}:{port}".encode()
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(limit)

    async def request(self, method: str, path: str, headers: Mapping[str, str], body: bytes = b"") -> Response:
        """One request; `Http1Error` (or `OSError` on connect) when no complete answer came back."""
        head = [
            f"{method} {path} HTTP/1.1\r\nhost: ".encode(),
            self._authority,
            b"\r\ncontent-length: %d\r\n" % len(body),
        ]
        head += [f"{name}: {value}\r\n".encode("latin-1") for name, value in headers.items()]
        request = b"".join([*head, b"\r\n", body])
        async with self._slots:
            conn = self._reuse() or await self._connect()
            try:
                response = await conn.exchange(request)
            except BaseException:
                conn.close()  # failed or cancelled mid-exchange: its state is unknown
                raise
            if conn.reusable:
                self._idle.append(conn)
            else:
                conn.close()
            return response

    def _reuse(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.reusable:
                return conn
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Connection, self._host, self._port)
        return conn

    def close(self) -> None:
        for conn in self._idle:
            with contextlib.suppress(Exception):
                conn.close()
        self._idle.clear()
