"""Under attack and overload, through a real Envoy in front of the real broker (loopback, bounded in time).

One test per finding of the hostile trial: slowloris, connection flood, heap overload,
container bomb, ext_proc overflow, a busy worker, kill -9 of a worker, forged identity
headers in open mode. Each checks what the client sees and the counter that counts it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from extproc import wire
from extproc.envoy import bootstrap_dict
from extproc.envoy.edge import HEAP_RUNTIME_KEY
from extproc.registry import hash_api_key, parse_registry
from tests.conftest import ClientOptions, RedisServer, Stack, demo_registry_doc, run_stack
from tests.http import JSON_HEADERS, Reply, call

CREDIT = "/v1/models/credit-risk/predict"
BODY = {"customer_id": "c-42", "amount": 100}
MAX_CONNECTIONS = 8
HEADER_TIMEOUT_MS = 1000


@pytest.fixture(scope="module")
def edge_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Open mode (no consumers) with a small connection limit and a 1 s header timeout."""
    doc = demo_registry_doc()
    doc["broker"]["workers"] = 1
    doc["listener"]["max_connections"] = MAX_CONNECTIONS
    doc["listener"]["request_headers_timeout_ms"] = HEADER_TIMEOUT_MS
    with run_stack(doc, tmp_path_factory.mktemp("edge")) as stack:
        yield stack


@pytest.fixture
def client_options() -> ClientOptions:
    # No pooled connections between requests: the flood test counts the listener's connections.
    return ClientOptions(timeout_s=30, force_close=True)


async def stat(session: aiohttp.ClientSession, stack: Stack, name: str) -> int:
    """One Envoy counter or gauge by exact name (0 before it first moves)."""
    async with session.get(f"{stack.admin}/stats?filter=^{re.escape(name)}$") as resp:
        found = re.findall(r": (\d+)", await resp.text())
    return int(found[0]) if found else 0


async def overflows(session: aiohttp.ClientSession, stack: Stack, cluster: str) -> int:
    """Requests `cluster`'s circuit breaker refused: counted as pending or active overflow, by whether a
    connection to the worker was already up when the limit was hit (both seen on Envoy 1.40)."""
    kinds = ("pending", "active")
    return sum([await stat(session, stack, f"cluster.{cluster}.upstream_rq_{kind}_overflow") for kind in kinds])


async def wait_for(condition: Any, timeout_s: float = 20.0) -> None:
    """Poll an async condition until it holds; fail after a generous deadline."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.05)


def read_until_closed(sock: socket.socket, timeout_s: float) -> bytes:
    sock.settimeout(timeout_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


async def test_slowloris_is_closed_within_the_header_timeout(edge_stack: Stack, session: aiohttp.ClientSession) -> None:
    """Connections that never finish their headers get 408 JSON and are closed within the header timeout, counted."""
    before = await stat(session, edge_stack, "http.public.downstream_rq_header_timeout")
    port = edge_stack.doc["listener"]["port"]
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    started = time.monotonic()
    for sock in slow:
        sock.sendall(b"POST /v1/models/credit-risk/predict HTTP/1.1\r\nhost: t\r\nx-slow: 1\r\n")
    answers = await asyncio.gather(*(asyncio.to_thread(read_until_closed, s, 10) for s in slow))
    elapsed = time.monotonic() - started
    for sock in slow:
        sock.close()
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer
        assert json.loads(body)["error"]["code"] == "request_timeout"
    assert elapsed < HEADER_TIMEOUT_MS / 1000 + 5, elapsed
    await wait_for(
        lambda: _at_least(session, edge_stack, "http.public.downstream_rq_header_timeout", before + len(slow))
    )


async def _at_least(session: aiohttp.ClientSession, stack: Stack, name: str, value: int) -> bool:
    return await stat(session, stack, name) >= value


async def test_connection_flood_is_refused_counted_and_clients_served_after(
    edge_stack: Stack, session: aiohttp.ClientSession
) -> None:
    """Past listener.max_connections a new connection is closed at once (counted); when the flood lets go, 200 again."""
    port = edge_stack.doc["listener"]["port"]
    active = "connection_limit.public.active_connections"
    await wait_for(lambda: _at_most(session, edge_stack, active, 0))
    limited = await stat(session, edge_stack, "connection_limit.public.limited_connections")
    flood = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_CONNECTIONS)]
    try:
        await wait_for(lambda: _at_least(session, edge_stack, active, MAX_CONNECTIONS))
        late = socket.create_connection(("127.0.0.1", port))
        late.sendall(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
        assert await asyncio.to_thread(read_until_closed, late, 10) == b""
        late.close()
        await wait_for(
            lambda: _at_least(session, edge_stack, "connection_limit.public.limited_connections", limited + 1)
        )
    finally:
        for sock in flood:
            sock.close()
    await wait_for(lambda: _at_most(session, edge_stack, active, 0))
    reply = await call(session, edge_stack.base + CREDIT, BODY)
    assert reply.status == 200, reply.raw


async def _at_most(session: aiohttp.ClientSession, stack: Stack, name: str, value: int) -> bool:
    return await stat(session, stack, name) <= value


async def test_container_bomb_is_refused_before_the_walk(edge_stack: Stack, session: aiohttp.ClientSession) -> None:
    """60 KB of empty containers (under the body limit) is a 400 naming the limit; a flat body that size passes."""
    bomb = b'{"customer_id": "c-42", "x": [' + b",".join([b"[]", b"{}"] * 10_000) + b"]}"
    reply = await call(session, edge_stack.base + CREDIT, data=bomb)
    assert reply.status == 400 and reply.error_code() == "invalid_body", reply.raw
    assert "more than" in reply.body["error"]["message"]
    flat = json.dumps({**BODY, "note": "n" * len(bomb)}).encode()
    assert (await call(session, edge_stack.base + CREDIT, data=flat)).status == 200


async def test_forged_identity_headers_never_reach_the_model_in_open_mode(
    edge_stack: Stack, session: aiohttp.ClientSession
) -> None:
    """Every x-broker-* header a client sends is removed before the model, also without consumers."""
    forged = {
        "x-broker-consumer": "ops",
        "x-broker-parent-request-id": "r-0",
        "x-broker-shadow-of": "credit-risk",
        "x-broker-sticky-key": "k",
        "x-broker-anything": "1",
    }
    echo = {**BODY, "_demo": {"credit-risk": {"echo_headers": True}}}
    reply = await call(session, edge_stack.base + CREDIT, echo, headers={**JSON_HEADERS, **forged})
    assert reply.status == 200, reply.raw
    received = reply.body["headers"]
    assert not [name for name in received if name.startswith("x-broker-")], received
    assert received["x-request-id"] == reply.headers["x-request-id"]


@pytest.fixture(scope="module")
def heap_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    doc = demo_registry_doc(ensembles=[])
    doc["broker"]["workers"] = 1
    with run_stack(doc, tmp_path_factory.mktemp("heap")) as stack:
        yield stack


async def test_heap_overload_answers_503_overloaded_and_counts(
    heap_stack: Stack, session: aiohttp.ClientSession
) -> None:
    """Over its heap budget Envoy refuses requests with 503 overloaded + retry-after, counted; under it, 200 again."""
    assert (await call(session, heap_stack.base + CREDIT, BODY)).status == 200
    budget = f"{heap_stack.admin}/runtime_modify?{HEAP_RUNTIME_KEY}="
    async with session.post(budget + str(1 << 20)) as resp:
        assert resp.status == 200
    try:
        await wait_for(
            lambda: _at_least(session, heap_stack, "overload.envoy.overload_actions.stop_accepting_requests.active", 1)
        )
        reply = await call(session, heap_stack.base + CREDIT, BODY)
        assert reply.status == 503 and reply.body["error"]["code"] == "overloaded", reply.raw
        assert reply.headers["retry-after"] == "1"
        assert await stat(session, heap_stack, "http.public.downstream_rq_overload_close") >= 1
    finally:
        async with session.post(budget + str(1 << 30)) as resp:
            assert resp.status == 200
    await wait_for(
        lambda: _at_most(session, heap_stack, "overload.envoy.overload_actions.stop_accepting_requests.active", 0)
    )
    assert (await call(session, heap_stack.base + CREDIT, BODY)).status == 200


async def burst(session: aiohttp.ClientSession, url: str, count: int) -> list[Reply]:
    return list(await asyncio.gather(*(call(session, url, BODY) for _ in range(count))))


def overloaded(reply: Reply) -> bool:
    return reply.status == 503 and reply.error_code() == "overloaded" and reply.headers.get("retry-after") == "1"


async def overflow_round(session: aiohttp.ClientSession, stack: Stack) -> list[Reply]:
    """Bursts until one overflows the breaker (bounded: 20 rounds); that round's refusals."""
    for _ in range(20):
        refused = [r for r in await burst(session, stack.base + CREDIT, 24) if r.status != 200]
        if refused:
            return refused
    return []


def one_stream_stack(doc: dict[str, Any]) -> dict[str, Any]:
    doc["broker"]["workers"] = 1
    doc["broker"]["max_streams"] = 1
    return doc


async def test_ext_proc_overflow_is_labelled_overloaded(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    """Past the ext_proc circuit breaker (workers x broker.max_streams): 503 overloaded, not broker_unavailable."""
    doc = one_stream_stack(demo_registry_doc(ensembles=[]))
    doc["broker"]["transport"] = "grpc"  # the gRPC cluster's breaker; http_service's is the next test's
    with run_stack(doc, tmp_path / "stack") as stack:
        refused = await overflow_round(session, stack)
        assert refused and all(overloaded(r) for r in refused), [r.raw for r in refused]
        assert await overflows(session, stack, "model_broker_ext_proc") == len(refused)  # each one counted


async def test_http_service_overflow_is_labelled_overloaded(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    """On http_service routes too: the retry hop answers an overflow as ext_proc_overflow, labelled overloaded."""
    doc = one_stream_stack(demo_registry_doc(ensembles=[]))
    del doc["audit"]  # one message per request, so one overflow per refused request
    doc["broker"]["transport"] = "http"
    with run_stack(doc, tmp_path / "stack") as stack:
        refused = await overflow_round(session, stack)
        assert refused and all(overloaded(r) for r in refused), [r.raw for r in refused]
        overflowed = await overflows(session, stack, "model_broker_ext_proc_http")
        assert overflowed >= 1


async def test_busy_worker_sheds_with_503_overloaded(
    redis_server: RedisServer, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A worker at broker.max_in_flight refuses more at once (503 overloaded, retry-after), counted."""
    doc = demo_registry_doc(
        ensembles=[],
        feature_store={"redis": {"url": redis_server.url}, "timeout_ms": 5000, "cache": {"ttl_seconds": 0}},
    )
    doc["broker"].update(workers=1, max_in_flight=2, message_timeout_ms=8000)
    with run_stack(doc, tmp_path / "stack") as stack:
        assert (await call(session, stack.base + CREDIT, BODY)).status == 200
        redis_server.cli("CLIENT", "PAUSE", "1500", "ALL")  # every feature fetch now waits
        started = time.monotonic()
        replies = await burst(session, stack.base + CREDIT, 8)
        statuses = sorted(r.status for r in replies)
        assert statuses.count(200) >= 2 and all(overloaded(r) for r in replies if r.status != 200), statuses
        assert time.monotonic() - started < 8
        metrics_url = f"http://127.0.0.1:{doc['metrics']['port']}/metrics"
        async with session.get(metrics_url) as resp:
            text = await resp.text()
        shed = re.findall(r'model_broker_requests_total\{[^}]*outcome="overloaded"[^}]*\} (\S+)', text)
        assert shed and float(shed[0]) == statuses.count(503), text[-2000:]


def worker_pid(stack: Stack, port: int) -> int:
    """The broker worker serving `port`, from the line it logs when it starts."""
    found = re.findall(rf"worker (\d+) serving ext_proc on [\d.]+:{port}\b", stack.procs["broker"].log.read_text())
    return int(found[-1])


async def kill_one_worker_under_load(session: aiohttp.ClientSession, stack: Stack) -> list[Reply]:
    """8 clients calling credit-risk for 4 s; 1 s in, kill -9 of the second of the two workers."""
    replies: list[Reply] = []

    async def client(end: float) -> None:
        while time.monotonic() < end:
            replies.append(await call(session, stack.base + CREDIT, BODY))

    load = asyncio.gather(*(client(time.monotonic() + 4.0) for _ in range(8)))
    await asyncio.sleep(1.0)
    os.kill(worker_pid(stack, stack.doc["broker"]["port"] + 1), signal.SIGKILL)
    await load
    assert len(replies) > 50, len(replies)
    return replies


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_kill_9_of_one_worker_costs_no_request(
    transport: str, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """kill -9 of one of two workers under load: every client request is served (its messages retried on the other)."""
    doc = demo_registry_doc(ensembles=[])
    del doc["audit"]  # single-message routes: the model is called after the broker's one answer
    doc["broker"].update(workers=2, transport=transport)
    cluster = "model_broker_ext_proc" if transport == "grpc" else "model_broker_ext_proc_http"
    with run_stack(doc, tmp_path / "stack") as stack:
        replies = await kill_one_worker_under_load(session, stack)
        assert [r.raw for r in replies if r.status != 200] == []
        # The kill hit messages in flight (or a connection not yet known dead), and they were sent again.
        assert await stat(session, stack, f"cluster.{cluster}.upstream_rq_retry_success") >= 1


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_kill_9_under_audit_runs_each_model_once_and_loses_no_record(
    transport: str, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Audited routes, kill -9 of one of two workers: each request reaches its model exactly once, none fails
    before it, and every answer has its record.

    gRPC: a request fails (503) if the killed worker had answered its request phase: the record its stream owed
    died with it. http_service: none fails, the draft travels with the request and another worker records it.
    """
    doc = demo_registry_doc(ensembles=[])
    doc["broker"].update(workers=2, transport=transport)
    with run_stack(doc, tmp_path / "stack") as stack:
        replies = await kill_one_worker_under_load(session, stack)
        failed = [r for r in replies if r.status != 200]
        assert all(r.status == 503 and r.error_code() == "broker_unavailable" for r in failed), [r.raw for r in failed]
        assert len(failed) <= (8 if transport == "grpc" else 0), len(failed)
        model_calls = sum(
            [await stat(session, stack, f"cluster.credit-risk--{v}.upstream_rq_total") for v in ("v1", "v2")]
        )
        assert model_calls == len(replies), (model_calls, len(replies), len(failed))
        answered = {r.headers["x-request-id"] for r in replies if r.status == 200}
        recorded = await records_of(stack, "credit-risk", answered)
        assert answered <= recorded, len(answered - recorded)


async def records_of(stack: Stack, model: str, ids: set[str], timeout_s: float = 20.0) -> set[str]:
    """Request ids of `model`'s records in the local sink, polled until `ids` are all there or time runs out
    (the killed worker's spool ships when its successor starts)."""
    sink = stack.workdir / stack.doc["audit"]["sink"]["local"]["dir"]
    deadline = time.monotonic() + timeout_s
    while True:
        found = {
            orjson.loads(line)["request_id"]
            for path in sink.rglob("*.jsonl")
            for line in path.read_bytes().splitlines()
            if orjson.loads(line)["model"] == model
        }
        if ids <= found or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.5)


def _found(node: Any, key: str) -> list[Any]:
    """Every value under `key` anywhere in a generated config."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == key] + [x for v in node.values() for x in _found(v, key)]
    if isinstance(node, list):
        return [x for v in node for x in _found(v, key)]
    return []


@pytest.mark.parametrize("retry", [True, False])
def test_retry_unanswered_is_the_hop_and_the_stream_retry(retry: bool) -> None:
    """broker.retry_unanswered: the model filter's gRPC retry and the http_service hop, both or neither; never on
    ensembles (their message calls models)."""
    doc = demo_registry_doc()
    doc["broker"].update(transport="http", retry_unanswered=retry)
    config = bootstrap_dict(parse_registry(doc))
    filters = {f["name"]: f["typedConfig"] for f in _found(config, "httpFilters")[0]}
    assert ("retryPolicy" in filters["envoy.filters.http.ext_proc"]["grpcService"]) is retry
    assert "retryPolicy" not in filters["model_broker.ensemble_ext_proc"]["grpcService"]
    targets = {
        f["httpService"]["httpService"]["httpUri"]["cluster"]
        for f in _found(config, "typedConfig")
        if "httpService" in f
    }
    assert targets == {wire.EXT_PROC_RETRY_LISTENER if retry else wire.EXT_PROC_HTTP_CLUSTER}
    listeners = [listener["name"] for listener in config["staticResources"]["listeners"]]
    assert (wire.EXT_PROC_RETRY_LISTENER in listeners) is retry


@pytest.mark.parametrize(
    ("transport", "failures"),
    [
        ("grpc", "http.public.ext_proc.streams_failed"),
        # The retry hop's answer once every worker refused the connection.
        ("http", "cluster.model_broker_ext_proc_http.upstream_rq_503"),
    ],
)
async def test_broker_down_floods_no_log(
    transport: str, failures: str, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Broker killed: each call is 503 broker_unavailable, audited routes and not, on either transport;
    Envoy logs no line per failure (ext_proc at critical), its stats count them."""
    doc = demo_registry_doc(ensembles=[])
    doc["broker"].update(workers=1, transport=transport)
    next(m for m in doc["models"] if m["name"] == "fraud")["audit"] = False  # one message per request
    with run_stack(doc, tmp_path / "stack") as stack:
        assert (await call(session, stack.base + CREDIT, BODY)).status == 200
        stack.procs["broker"].kill()
        paths = [CREDIT, "/v1/models/fraud/predict"] * 10
        replies = [await call(session, stack.base + path, BODY) for path in paths]
        assert all(r.status == 503 and r.error_code() == "broker_unavailable" for r in replies), [
            r.raw for r in replies
        ]
        assert await stat(session, stack, failures) >= len(paths)
        assert "[ext_proc]" not in stack.procs["envoy"].log.read_text()


async def test_unauthenticated_flood_gets_429_before_authentication(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """An address that keeps failing authentication gets 429 for everything, without a broker call; then recovers."""
    doc = demo_registry_doc(ensembles=[])
    doc["broker"]["workers"] = 1
    doc["consumers"] = [{"name": "alice", "api_keys": [hash_api_key("alice-secret")], "models": ["*"]}]
    doc["limits"]["unauthenticated"] = {"requests": 1, "unit": "second", "burst": 5}
    del doc["audit"]  # audited routes send even refusals to the broker (their record); here none may reach it
    good = {**JSON_HEADERS, "x-api-key": "alice-secret"}
    with run_stack(doc, tmp_path / "stack") as stack:
        served = [await call(session, stack.base + CREDIT, BODY, headers=good) for _ in range(10)]
        assert all(r.status == 200 for r in served), "a caller that authenticates never spends the budget"
        streams = await stat(session, stack, "cluster.model_broker_ext_proc.upstream_rq_total")
        wrong = {**JSON_HEADERS, "x-api-key": "guess"}
        # Each Envoy worker thread (one per core) keeps its own buckets: at most burst x threads 401s,
        # plus what refills while the flood runs.
        most_401s = 5 * (os.cpu_count() or 1) + 5
        flood = [await call(session, stack.base + CREDIT, BODY, headers=wrong) for _ in range(most_401s + 20)]
        statuses = [r.status for r in flood]
        assert statuses[:5] == [401] * 5 and set(statuses) == {401, 429}, statuses
        assert statuses.count(401) <= most_401s and statuses[-10:] == [429] * 10, statuses
        limited = next(r for r in flood if r.status == 429)
        assert limited.error_code() == "rate_limited" and limited.headers["retry-after"] == "1"
        locked = await call(session, stack.base + CREDIT, BODY, headers=good)
        assert locked.status == 429, "the address is locked out, whatever it sends"
        assert await stat(session, stack, "cluster.model_broker_ext_proc.upstream_rq_total") == streams
        await wait_for(lambda: _served(session, stack.base + CREDIT, good))


async def _served(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> bool:
    return (await call(session, url, BODY, headers=headers)).status == 200
