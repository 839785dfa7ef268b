"""A plain aiohttp reverse proxy doing the broker's enrichment: the lean Python alternative to ext_proc.

Same hot-path work as the broker: parse the JSON body, one HMGET from the same
Redis under the same 50 ms budget, inject under "features", forward to the model
over a pooled session. One process per worker, sharing the port by SO_REUSEPORT.
Run: `python -m bench.gateways.aiohttp_gateway --port P --redis-url URL --backend-url URL`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import orjson
import uvloop
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bench import workload

REDIS = web.AppKey("redis", Redis)
UPSTREAM = web.AppKey("upstream", ClientSession)
BACKEND_URL = web.AppKey("backend_url", str)


def _error(status: int, code: str) -> web.Response:
    return web.Response(status=status, body=orjson.dumps({"error": {"code": code}}), content_type=workload.JSON)


async def predict(request: web.Request) -> web.Response:
    try:
        doc: Any = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "invalid_json")
    customer = doc.get(workload.JOIN_KEY) if isinstance(doc, dict) else None
    if not isinstance(customer, str):
        return _error(400, "missing_entity_key")
    try:
        # Fail closed, like the broker: no features, no forward.
        async with asyncio.timeout(workload.STORE_TIMEOUT_MS / 1000):
            values = await request.app[REDIS].hmget(workload.store_key(customer), list(workload.FEATURES))
    except (TimeoutError, RedisError, OSError):
        return _error(503, "feature_store_unavailable")
    if all(v is None for v in values):
        return _error(404, "unknown_entity")
    doc[workload.INJECT_AS] = {
        name: None if raw is None else workload.decode_value(raw)
        for name, raw in zip(workload.FEATURES, values, strict=True)
    }
    session = request.app[UPSTREAM]
    headers = {"content-type": workload.JSON}
    async with session.post(request.app[BACKEND_URL], data=orjson.dumps(doc), headers=headers) as upstream:
        body = await upstream.read()
        return web.Response(status=upstream.status, body=body, content_type=workload.JSON)


async def healthz(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


def gateway_app(redis_url: str, backend_url: str) -> web.Application:
    app = web.Application()
    app[BACKEND_URL] = backend_url

    async def clients(app: web.Application) -> AsyncIterator[None]:
        app[REDIS] = Redis.from_url(redis_url, socket_timeout=workload.STORE_TIMEOUT_MS / 1000)
        # One pooled session per worker: keep-alive connections to the model.
        app[UPSTREAM] = ClientSession(connector=TCPConnector(limit=256), timeout=ClientTimeout(total=15))
        yield
        await app[UPSTREAM].close()
        await app[REDIS].aclose()

    app.cleanup_ctx.append(clients)
    app.router.add_post(workload.MODEL_PATH, predict)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(port: int, redis_url: str, backend_url: str) -> None:
    runner = web.AppRunner(gateway_app(redis_url, backend_url), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port, reuse_port=True).start()
        print("ready", flush=True)  # the bench waits for this line from every worker
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--backend-url", required=True, help="the model's predict URL")
    args = parser.parse_args(argv)
    uvloop.run(serve(args.port, args.redis_url, args.backend_url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
