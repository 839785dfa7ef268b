"""The audit trail at the broker's full rate for a minute: the shipper keeps up, the spool drains, nothing is lost.

Adds about 80 s to the suite (60 s of load, the drain, the read-back); the minute is
the issue's own figure, long enough for a shipper that falls behind to show it.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterator

import aiohttp
import pytest

from extproc.adapters.aws_audit import AwsAuditStore
from extproc.audit import spool_status
from extproc.registry import AwsAuditSink
from tests.aws import BUCKET, PREFIX, TABLE, Moto, audit_status, audited_registry, demo_body, running_moto, url
from tests.conftest import ClientOptions, Stack, run_stack
from tests.http import Reply, call

LOAD_SECONDS = 60.0
CONNECTIONS = 32
# The goal: everything shipped this soon after the load stops.
DRAIN_SECONDS = 10.0


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    with running_moto(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture(scope="module")
def full_rate_stack(moto: Moto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Envoy + the broker (registry defaults: 2 workers, 4 MiB segments sealed after 2 s) auditing one model to moto."""
    sink = AwsAuditSink(bucket=BUCKET, table=TABLE, prefix=PREFIX, endpoint_url=moto.url)
    AwsAuditStore(sink, timeout_s=30).create_resources()
    doc = audited_registry(moto.url, ["audit-rate"])
    doc["audit"]["spool"] = {"dir": "spool"}  # the defaults, as a deployment would run
    doc["audit"].pop("ship_interval_ms")
    with run_stack(doc, tmp_path_factory.mktemp("full-rate")) as stack:
        yield stack


@pytest.fixture
def client_options() -> ClientOptions:
    # One pooled connection per concurrent client of `load`.
    return ClientOptions(limit=CONNECTIONS)


async def load(session: aiohttp.ClientSession, target: str, seconds: float) -> list[Reply]:
    """CONNECTIONS clients back to back, as fast as the stack answers, until `seconds` have passed."""
    stop_at = time.monotonic() + seconds
    replies: list[Reply] = []

    async def client(worker: int) -> None:
        n = 0
        while time.monotonic() < stop_at:
            replies.append(await call(session, target, data=demo_body(worker * 1_000_000 + n)))
            n += 1

    await asyncio.gather(*(client(w) for w in range(CONNECTIONS)))
    return replies


async def spool_empty_after(stack: Stack, since: float) -> float:
    """Seconds from `since` until every worker's spool is empty (read from disk, as `audit status` does)."""
    while True:
        waited = time.monotonic() - since
        if spool_status(stack.workdir / "spool", 1, time.time())["bytes"] == 0 or waited > DRAIN_SECONDS * 3:
            return waited
        await asyncio.sleep(0.1)


async def test_a_minute_at_full_rate_drains_within_seconds_with_exact_counts(
    full_rate_stack: Stack, moto: Moto, session: aiohttp.ClientSession
) -> None:
    """60 s at full rate: every answer audited once, in S3 and DynamoDB, and the spool empty ≤ 10 s after."""
    config = str(full_rate_stack.config)
    replies = await load(session, url(full_rate_stack, "audit-rate"), LOAD_SECONDS)
    stopped = time.monotonic()
    assert collections.Counter(r.status for r in replies) == {200: len(replies)}
    drained_after = await spool_empty_after(full_rate_stack, stopped)
    rate = len(replies) / LOAD_SECONDS
    print(f"{len(replies)} requests, {rate:.0f} req/s; spool empty {drained_after:.1f} s after the load")
    assert drained_after <= DRAIN_SECONDS, f"spool not drained {DRAIN_SECONDS:.0f} s after the load ({rate:.0f} req/s)"
    status = await audit_status(config)
    assert status["bytes"] == 0
    assert status["shipping"]["ship_failures"] == 0
    assert status["shipping"]["shipped_records"] == len(replies)
    sent = {r.headers["x-request-id"] for r in replies}
    items = await asyncio.to_thread(moto.items, "audit-rate")
    assert sorted(i["request_id"]["S"] for i in items) == sorted(sent)  # each exactly once
    records = await asyncio.to_thread(moto.records, "audit-rate")
    assert sorted(r["request_id"] for r in records) == sorted(sent)
