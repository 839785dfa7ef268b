"""The ext_proc `http_service` front end: Envoy POSTs each phase as JSON over HTTP/1.1.

One asyncio Protocol per connection, httptools (llhttp) parsing, no framework: the
whole transport costs a few tens of µs per request where a grpc.aio stream costs
hundreds. Every HTTP request is one phase with no stream around it, so only routes
that send Envoy's one message per request (the generated config decides) come here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

import httptools
import orjson

from extproc.core.context import RequestContext
from extproc.core.processor import Processor
from extproc.core.responses import Answer
from extproc.transport.http_messages import carry_draft, decode, encode

log = logging.getLogger("model_broker.http_service")

Handler = Callable[[Any, RequestContext], Awaitable[Answer]]

_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed", 413: b"Payload Too Large"}
_REASONS[500] = b"Internal Server Error"


def response_bytes(status: int, body: bytes, *, close: bool) -> bytes:
    """One HTTP/1.1 response, head and body in one buffer (one write, one syscall)."""
    head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % (
        status,
        _REASONS[status],
        len(body),
    )
    return head + (b"connection: close\r\n\r\n" if close else b"\r\n") + body


def _error(message: str) -> bytes:
    return orjson.dumps({"error": message})


class HttpService:
    """Serves the processor to Envoy's `http_service` on any number of listening sockets."""

    def __init__(self, processor: Processor, *, path: str, max_bytes: int) -> None:
        self.path = path.encode()
        self.max_bytes = max_bytes
        self.finish = processor.finish
        self.handlers: dict[str, Handler] = {
            "request_headers": processor.request_headers,
            "request_body": processor.request_body,
            "response_headers": processor.response_headers,
            "response_body": processor.response_body,
        }
        self.connections: set[_Connection] = set()
        self.draining = False
        self._servers: list[asyncio.Server] = []
        # Set when draining and the last connection has closed.
        self.all_closed = asyncio.Event()

    async def listen_tcp(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._servers.append(await loop.create_server(lambda: _Connection(self), host, port, reuse_port=False))

    async def listen_unix(self, path: str) -> None:
        loop = asyncio.get_running_loop()
        self._servers.append(await loop.create_unix_server(lambda: _Connection(self), path))

    async def drain(self, timeout_s: float) -> None:
        """Stop accepting; idle connections close now, busy ones after their answer (`connection: close`)."""
        self.draining = True
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.close_if_idle()
        if not self.connections:
            self.all_closed.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.all_closed.wait(), timeout_s)
        for conn in list(self.connections):
            conn.abort()
        for server in self._servers:
            await server.wait_closed()


class _Connection(asyncio.Protocol):
    """One connection from Envoy's pool: messages answered one at a time, in order."""

    def __init__(self, service: HttpService) -> None:
        self._service = service
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._body: list[bytes] = []
        self._size = 0
        # Parsed messages not answered yet (Envoy does not pipeline; a client might).
        self._queue: collections.deque[tuple[int, bytes, bool]] = collections.deque()
        self._busy = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)
        self._service.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._service.connections.discard(self)
        self._transport = None
        if self._service.draining and not self._service.connections:
            self._service.all_closed.set()

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._write(400, _error(f"malformed HTTP request: {exc}"), close=True)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._url, self._body, self._size = b"", [], 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size <= self._service.max_bytes:
            self._body.append(body)

    def on_message_complete(self) -> None:
        status = 200
        if self._url.split(b"?", 1)[0] != self._service.path:
            status = 404
        elif self._parser.get_method() != b"POST":
            status = 405
        elif self._size > self._service.max_bytes:
            status = 413
        self._queue.append((status, b"".join(self._body), self._parser.should_keep_alive()))
        if not self._busy:
            self._next()

    # answering

    def _next(self) -> None:
        status, raw, keep_alive = self._queue.popleft()
        if status != 200:
            self._write(status, _error(f"POST ext_proc messages to {self._service.path.decode()}"), close=True)
            return
        self._busy = True
        asyncio.get_running_loop().create_task(self._answer(raw, keep_alive))

    async def _answer(self, raw: bytes, keep_alive: bool) -> None:
        ctx = RequestContext()
        try:
            decoded = decode(raw, ctx)
            if isinstance(decoded, str):
                self._write(400, _error(decoded), close=not keep_alive)
                return
            phase, msg = decoded
            answer = carry_draft(phase, await self._service.handlers[phase](msg, ctx), ctx)
            self._write(200, encode(phase, answer), close=not keep_alive)
        except Exception:
            # Envoy answers the client with its error status (503 broker_unavailable JSON).
            log.exception("ext_proc message failed")
            self._write(500, _error("the broker failed on this message"), close=True)
        finally:
            # Exactly once per message, also when the processor failed; one message is one request here.
            self._service.finish(ctx)
            self._busy = False
            if self._queue and self._transport is not None:
                self._next()

    def _write(self, status: int, body: bytes, *, close: bool) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return  # Envoy gave up on this message (its timeout); nothing to answer
        close = close or self._service.draining
        transport.write(response_bytes(status, body, close=close))
        if close:
            self._queue.clear()
            transport.close()

    def close_if_idle(self) -> None:
        if not self._busy and self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            with contextlib.suppress(Exception):
                self._transport.abort()
