"""Latency at a fixed request rate, where no process is saturated: what the broker adds to one request.

wrk keeps N connections busy (closed loop): its latency is queueing at saturation.
Here requests leave on a schedule (open loop, `rate` per second), each timed from
when it was due, so a stall shows up in the percentiles instead of slowing the
sender (no coordinated omission). The client is aiohttp on uvloop; at 200 req/s
it is nowhere near its own limit.
"""

from __future__ import annotations

import asyncio
import collections
import statistics
import time
from dataclasses import dataclass

import aiohttp
import orjson
import uvloop

from bench import workload


@dataclass(frozen=True, slots=True)
class FixedRateResult:
    rate: float
    requests: int
    failures: int
    p50_ms: float
    p99_ms: float
    # "503 broker_unavailable" → count: what the failures were, from the error body.
    failure_kinds: dict[str, int]


async def _run(url: str, rate: float, duration_s: float) -> FixedRateResult:
    total = int(rate * duration_s)
    latencies: list[float] = []
    kinds: collections.Counter[str] = collections.Counter()
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as session:

        async def one(index: int, due: float) -> None:
            body = workload.request_body(index % workload.CUSTOMERS + 1)
            headers = {"content-type": workload.JSON}
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    answer = await resp.read()
                    if resp.status != 200:
                        kinds[f"{resp.status} {_error_code(answer)}"] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                kinds[type(exc).__name__] += 1
            latencies.append(time.perf_counter() - due)

        # Warm the pool and caches, then start the clock.
        await asyncio.gather(*(one(i, time.perf_counter()) for i in range(32)))
        latencies.clear()
        kinds.clear()
        start = time.perf_counter()
        tasks = []
        for i in range(total):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, due)))
        await asyncio.gather(*tasks)
    cuts = statistics.quantiles(latencies, n=100)
    return FixedRateResult(rate, total, sum(kinds.values()), cuts[49] * 1000, cuts[98] * 1000, dict(kinds))


def _error_code(body: bytes) -> str:
    try:
        return str(orjson.loads(body)["error"]["code"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "?"


def fixed_rate(url: str, rate: float, duration_s: float) -> FixedRateResult:
    """`rate` requests per second to `url` for `duration_s`, open loop; latency percentiles."""
    result: FixedRateResult = uvloop.run(_run(url, rate, duration_s))
    return result
