"""CPU per member call of the broker's egress client: aiohttp (before) against the lean `Http1Pool` (now).

The peer is a minimal keep-alive echo (httptools) in its own process, so only the
client's CPU is measured (time.process_time in the client process): `--calls` POSTs
of a member-sized body, `--concurrency` at a time, as an ensemble's fan-out does.
Not a test.

    .venv/bin/python -m bench.egress_cost [--calls 20000] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
import httptools
import uvloop

from extproc.adapters.http1 import Http1Pool
from extproc.process.launcher import free_port, wait_listening

BODY = b'{"customer_id":"c-1","amount":1200,"features":{"income":46500,"debt_ratio":0.041,"tenure_months":71}}'


class _Echo(asyncio.Protocol):
    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._body: list[bytes] = []
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's transport has the methods

    def data_received(self, data: bytes) -> None:
        self._parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        body, self._body = b"".join(self._body), []
        head = (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-broker-version: v1\r\ncontent-length: %d\r\n\r\n"
        )
        assert self._transport is not None
        self._transport.write(head % len(body) + body)


def _serve(port: int) -> None:
    async def main() -> None:
        await asyncio.get_running_loop().create_server(_Echo, "127.0.0.1", port)
        await asyncio.sleep(3600)

    uvloop.run(main())


async def _aiohttp(url: str, calls: int, concurrency: int) -> float:
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=512), cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False
    ) as session:

        async def worker(n: int) -> None:
            for _ in range(n):
                async with session.post(url, data=BODY, headers={"content-type": "application/json"}) as resp:
                    await resp.read()

        started = time.process_time()
        await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
        return time.process_time() - started


async def _lean(port: int, calls: int, concurrency: int) -> float:
    pool = Http1Pool("127.0.0.1", port, 512)

    async def worker(n: int) -> None:
        for _ in range(n):
            await pool.request("POST", "/m", {"content-type": "application/json"}, BODY)

    started = time.process_time()
    await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
    pool.close()
    return time.process_time() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.egress_cost", description=__doc__)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    port = free_port()
    peer = multiprocessing.get_context("spawn").Process(target=_serve, args=(port,), daemon=True)
    peer.start()
    wait_listening(port)
    runs: tuple[tuple[str, Callable[[], Coroutine[Any, Any, float]]], ...] = (
        ("aiohttp", lambda: _aiohttp(f"http://127.0.0.1:{port}/m", args.calls, args.concurrency)),
        ("Http1Pool", lambda: _lean(port, args.calls, args.concurrency)),
    )
    for name, run in runs:
        uvloop.run(run())  # warm-up: connections, imports
        cpu = uvloop.run(run())
        print(f"{name:<10} {cpu * 1e6 / args.calls:6.1f} µs client CPU per call")
    print(f"load average {os.getloadavg()[0]:.1f}")
    peer.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
