"""The egress hop's HTTP/1.1 client against a real socket peer: reuse, closes, failures, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from extproc.adapters.http1 import Http1Error, Http1Pool
from extproc.process.launcher import free_port

Reply = Callable[[bytes], Awaitable[bytes | None]]


class Peer:
    """A loopback server answering each request head with `reply(head)` (None: hang up; `close_after`: hang up
    after each answer)."""

    def __init__(self, reply: Reply, close_after: bool = False) -> None:
        self.reply = reply
        self.close_after = close_after
        self.connections = 0
        self.port = free_port()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = int(
                    next(line.split(b":")[1] for line in head.split(b"\r\n") if line.startswith(b"content-length"))
                )
                await reader.readexactly(length)
                answer = await self.reply(head)
                if answer is None:
                    break
                writer.write(answer)
                if self.close_after or b"connection: close" in answer:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


@contextlib.asynccontextmanager
async def peer(reply: Reply, close_after: bool = False) -> AsyncIterator[Peer]:
    server_side = Peer(reply, close_after)
    server = await asyncio.start_server(server_side.handle, "127.0.0.1", server_side.port)
    yield server_side
    server.close()


def ok(body: bytes = b"{}", *extra: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nx-broker-version: v1\r\n%s\r\n%s" % (
        len(body),
        b"".join(extra),
        body,
    )


async def test_connections_are_reused_and_answers_read_whole() -> None:
    """Sequential requests share one connection; status, lower-cased headers and body come back."""

    async def echo_path(head: bytes) -> bytes:
        return ok(head.split(b" ")[1])

    async with peer(echo_path) as server:
        pool = Http1Pool("127.0.0.1", server.port, limit=4)
        answers = [await pool.request("POST", f"/m/{i}", {"x-a": "b"}, b'{"k": 1}') for i in range(3)]
        assert [(a.status, a.body, a.headers["x-broker-version"]) for a in answers] == [
            (200, f"/m/{i}".encode(), "v1") for i in range(3)
        ]
        assert server.connections == 1
        pool.close()


async def test_a_connection_the_peer_closes_is_not_reused() -> None:
    """`connection: close` answers are read, and the next request opens a new connection."""

    async def closing(head: bytes) -> bytes:
        return ok(b"{}", b"connection: close\r\n")

    async with peer(closing) as server:
        pool = Http1Pool("127.0.0.1", server.port, limit=4)
        for _ in range(2):
            assert (await pool.request("GET", "/", {})).status == 200
        assert server.connections == 2
        pool.close()


@pytest.mark.parametrize(
    "answer",
    [None, b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{}", b"garbage\r\n\r\n"],
    ids=["hang-up", "short", "not-http"],
)
async def test_no_complete_answer_is_an_http1_error(answer: bytes | None) -> None:
    """A peer that hangs up, answers short or answers garbage gives `Http1Error`, never a hang."""

    async def broken(head: bytes) -> bytes | None:
        return answer

    async with peer(broken, close_after=True) as server:
        pool = Http1Pool("127.0.0.1", server.port, limit=4)
        with pytest.raises(Http1Error):
            await asyncio.wait_for(pool.request("POST", "/", {}, b"{}"), 10)
        pool.close()


async def test_refused_connection_is_an_os_error() -> None:
    """Nothing listening: the connect error surfaces (the egress adapter turns it into its own)."""
    pool = Http1Pool("127.0.0.1", free_port(), limit=4)
    with pytest.raises(ConnectionRefusedError):
        await pool.request("GET", "/", {})


async def test_a_cancelled_request_drops_its_connection() -> None:
    """A caller's budget expiring mid-exchange closes that connection; the next request gets a fresh one."""
    release = asyncio.Event()

    async def slow_then_fast(head: bytes) -> bytes:
        if b"/slow" in head:
            await release.wait()
        return ok()

    async with peer(slow_then_fast) as server:
        pool = Http1Pool("127.0.0.1", server.port, limit=4)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pool.request("GET", "/slow", {}), 0.2)
        release.set()
        assert (await pool.request("GET", "/fast", {})).status == 200
        assert server.connections == 2
        pool.close()
