"""Through a real Envoy, a real broker, real Redis and the demo models: what a client sees."""

from __future__ import annotations

import asyncio
import collections
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from extproc.process.launcher import free_port
from tests.conftest import RedisServer, Stack, demo_registry_doc, demo_rows, run_stack
from tests.http import JSON_HEADERS, Reply, call

PATH = "/v1/models/credit-risk/predict"
DEMO_FEATURES = ("income", "debt_ratio", "tenure_months", "late_payments_12m")


def expected_features(customer: str) -> dict[str, Any]:
    row = demo_rows()[f"customer:{customer}"]
    return {name: row[name] for name in DEMO_FEATURES}


async def upstream_requests(session: aiohttp.ClientSession, stack: Stack) -> int:
    """Requests Envoy sent to any credit-risk version, from its admin stats."""
    async with session.get(f"{stack.admin}/stats?filter=credit-risk--v[0-9]+\\.upstream_rq_total$") as resp:
        text = await resp.text()
    return sum(int(n) for n in re.findall(r": (\d+)$", text, re.MULTILINE))


async def test_features_reach_the_model(redis_stack: Stack, session: aiohttp.ClientSession) -> None:
    """The model receives the customer's features from Redis; Envoy reports model and version."""
    reply = await call(session, redis_stack.base + PATH, {"customer_id": "c-7", "amount": 1200})
    assert reply.status == 200, reply.raw
    assert reply.body["features"] == expected_features("c-7")
    assert reply.headers["x-broker-model"] == "credit-risk"
    assert reply.headers["x-broker-version"] == reply.body["version"]
    stages = [s.split(";")[0].strip() for s in reply.headers["server-timing"].split(",")]
    assert stages == ["broker-route", "broker-features", "broker-body"]
    assert "x-broker-degraded" not in reply.headers


async def test_consumer_cannot_spoof_features(redis_stack: Stack, session: aiohttp.ClientSession) -> None:
    """Features sent by the consumer are replaced whole by the store's."""
    spoof = {"customer_id": "c-8", "features": {"income": 10**9, "vip": True}}
    reply = await call(session, redis_stack.base + PATH, spoof)
    assert reply.status == 200, reply.raw
    assert reply.body["features"] == expected_features("c-8")


async def test_weighted_split_80_20(redis_stack: Stack, session: aiohttp.ClientSession) -> None:
    """Over 2,000 requests Envoy's split lands within ±3 points of 80/20, and the header tells the truth."""
    limit = asyncio.Semaphore(32)

    async def one(i: int) -> Reply:
        async with limit:
            return await call(session, redis_stack.base + PATH, {"customer_id": f"c-{i % 100 + 1}"})

    replies = await asyncio.gather(*(one(i) for i in range(2000)))
    assert all(r.status == 200 for r in replies), collections.Counter(r.status for r in replies)
    assert all(r.headers["x-broker-version"] == r.body["version"] for r in replies)
    share = collections.Counter(r.body["version"] for r in replies)["v1"] / len(replies) * 100
    assert 77 <= share <= 83, share


BAD_INPUTS: list[tuple[str, dict[str, Any], int, str]] = [
    ("malformed", {"data": b'{"customer_id": '}, 400, "invalid_json"),
    ("empty", {"data": b""}, 400, "invalid_json"),
    ("no-body", {"data": None}, 400, "invalid_json"),
    ("invalid-utf8", {"data": b'{"customer_id": "c-1", "x": "\xff\xfe"}'}, 400, "invalid_json"),
    ("absurd-nesting", {"data": b'{"customer_id": "c-1", "x": ' + b"[" * 100 + b"]" * 100 + b"}"}, 400, "invalid_body"),
    ("array", {"data": b'[{"customer_id": "c-1"}]'}, 400, "invalid_body"),
    ("missing-key", {"data": b'{"amount": 5}'}, 400, "missing_entity_key"),
    ("null-key", {"data": b'{"customer_id": null}'}, 400, "invalid_entity_key"),
    ("unknown-entity", {"data": b'{"customer_id": "c-404"}'}, 404, "unknown_entity"),
    (
        "text-plain",
        {"data": b'{"customer_id": "c-1"}', "headers": {"content-type": "text/plain"}},
        415,
        "unsupported_media_type",
    ),
    (
        "no-content-type",
        {"data": b'{"customer_id": "c-1"}', "headers": {"x-other": "1"}},
        415,
        "unsupported_media_type",
    ),
    ("just-over-limit", {"data": b'{"customer_id": "c-1", "pad": "' + b"a" * 66000 + b'"}'}, 413, "body_too_large"),
    ("far-over-limit", {"data": b'{"pad": "' + b"a" * 200_000 + b'"}'}, 413, "body_too_large"),
    ("get", {"method": "GET", "data": None}, 405, "method_not_allowed"),
]


@pytest.mark.parametrize(("case", "request_args", "status", "code"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
async def test_bad_input_gets_json_error_and_never_reaches_a_model(
    redis_stack: Stack, session: aiohttp.ClientSession, case: str, request_args: dict[str, Any], status: int, code: str
) -> None:
    """Every bad input: its status, the JSON error shape, and zero requests at the model."""
    before = await upstream_requests(session, redis_stack)
    args = {"method": "POST", "headers": JSON_HEADERS, **request_args}
    reply = await call(
        session, redis_stack.base + PATH, data=args["data"], method=args["method"], headers=args["headers"]
    )
    assert reply.status == status, (case, reply.raw)
    assert reply.error_code() == code
    assert "upstream" not in reply.body["error"]["message"]
    assert await upstream_requests(session, redis_stack) == before


async def test_missing_key_error_names_the_field(redis_stack: Stack, session: aiohttp.ClientSession) -> None:
    """The 400 for a missing entity key says which field to send."""
    reply = await call(session, redis_stack.base + PATH, {"amount": 1})
    assert "'customer_id'" in reply.body["error"]["message"]
    # No model answered, so Envoy reports no version; the broker's own stages are still timed.
    assert "x-broker-version" not in reply.headers
    assert reply.headers["server-timing"].startswith("broker-reject;dur=")


async def test_unknown_path_is_404_json(redis_stack: Stack, session: aiohttp.ClientSession) -> None:
    """A path no model serves: 404 with the error shape and Envoy's request id."""
    reply = await call(session, redis_stack.base + "/v1/models/nope/predict", {"customer_id": "c-1"})
    assert reply.status == 404
    assert reply.error_code() == "unknown_route"
    assert "x-broker-version" not in reply.headers
    assert reply.body["error"]["request_id"] == reply.headers["x-request-id"]


async def test_request_id_matches_header(redis_stack: Stack, session: aiohttp.ClientSession) -> None:
    """The request id in a broker error is the one Envoy returns as x-request-id."""
    reply = await call(session, redis_stack.base + PATH, {"amount": 1})
    assert reply.body["error"]["request_id"] == reply.headers["x-request-id"]


async def test_healthz_and_models_through_envoy(redis_stack: Stack, session: aiohttp.ClientSession) -> None:
    """GET /healthz and /models are answered by the broker through Envoy."""
    health = await call(session, redis_stack.base + "/healthz", method="GET")
    assert health.status == 200 and health.body["status"] == "ok"
    models = await call(session, redis_stack.base + "/models", method="GET")
    assert models.status == 200
    model = next(m for m in models.body["models"] if m["name"] == "credit-risk")
    assert model["features"] == list(DEMO_FEATURES)
    assert [(v["name"], v["weight"]) for v in model["versions"]] == [("v1", 80), ("v2", 20)]


def outage_registry(redis_url: str) -> dict[str, Any]:
    """The demo model (fail-closed) plus a fail-open twin that forwards unknown entities."""
    # A stopped Redis refuses at once; the generous budget only keeps a loaded box from timing out.
    doc = demo_registry_doc(
        feature_store={"redis": {"url": redis_url}, "timeout_ms": 1000, "cache": {"ttl_seconds": 0}}
    )
    doc["broker"]["message_timeout_ms"] = 1500
    open_model = {
        **doc["models"][0],
        "name": "credit-risk-open",
        "path": "/v1/models/credit-risk-open/predict",
        "failure_policy": "fail_open",
        "unknown_entity": "forward",
        "versions": [
            {**v, "backend": {"service": {**v["backend"]["service"], "port": free_port()}}}
            for v in doc["models"][0]["versions"]
        ],
    }
    doc["models"].append(open_model)
    return doc


@pytest.fixture(scope="module")
def outage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, RedisServer]]:
    """A stack on its own Redis, which the tests stop and start."""
    redis = RedisServer(tmp_path_factory.mktemp("outage-redis"))
    redis.start()
    redis.seed(demo_rows())
    try:
        with run_stack(outage_registry(redis.url), tmp_path_factory.mktemp("outage")) as stack:
            yield stack, redis
    finally:
        redis.stop()


async def test_redis_down_503_then_recovery(outage: tuple[Stack, RedisServer], session: aiohttp.ClientSession) -> None:
    """Redis stopped: 503 JSON within the store timeout; Redis back: 200 again, no broker restart."""
    stack, redis = outage
    assert (await call(session, stack.base + PATH, {"customer_id": "c-1"})).status == 200
    redis.stop()
    try:
        started = time.monotonic()
        reply = await call(session, stack.base + PATH, {"customer_id": "c-2"})
        assert time.monotonic() - started < 2.0
        assert reply.status == 503, reply.raw
        assert reply.error_code() == "feature_store_unavailable"
        fail_open = await call(session, stack.base + "/v1/models/credit-risk-open/predict", {"customer_id": "c-2"})
        assert fail_open.status == 200, fail_open.raw
        assert fail_open.body["features"] == {}
        assert fail_open.headers["x-broker-degraded"] == "feature_store_unavailable"
    finally:
        redis.start()
        redis.seed(demo_rows())  # no persistence: a restarted test Redis comes back empty
    broker_pid = stack.procs["broker"].popen.pid  # type: ignore[union-attr]
    deadline = time.monotonic() + 10
    open_path = stack.base + "/v1/models/credit-risk-open/predict"
    while True:  # each worker recovers on its own next call: ask until several in a row succeed, on both models
        replies = [
            await call(session, url, {"customer_id": "c-3"}) for _ in range(6) for url in (stack.base + PATH, open_path)
        ]
        reply = next((r for r in replies if r.status != 200 or "x-broker-degraded" in r.headers), replies[-1])
        if (reply.status == 200 and "x-broker-degraded" not in reply.headers) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert reply.status == 200 and "x-broker-degraded" not in reply.headers, (reply.raw, reply.headers)
    assert reply.body["features"] == expected_features("c-3")
    assert stack.procs["broker"].popen.pid == broker_pid  # type: ignore[union-attr]


async def test_unknown_entity_forwarded_when_declared(
    outage: tuple[Stack, RedisServer], session: aiohttp.ClientSession
) -> None:
    """`unknown_entity: forward`: the model gets empty features and the client is told why."""
    stack, _ = outage
    reply = await call(session, stack.base + "/v1/models/credit-risk-open/predict", {"customer_id": "c-999"})
    assert reply.status == 200, reply.raw
    assert reply.body["features"] == {}
    assert reply.headers["x-broker-degraded"] == "unknown_entity"


@pytest.fixture(scope="module")
def embedded_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The demo as shipped: embedded feature store, no Redis."""
    with run_stack(demo_registry_doc(), tmp_path_factory.mktemp("embedded")) as stack:
        yield stack


async def test_embedded_store_serves_the_demo(embedded_stack: Stack, session: aiohttp.ClientSession) -> None:
    """With no Redis at all, demo customers get their features from the bundled file."""
    reply = await call(session, embedded_stack.base + PATH, {"customer_id": "c-100", "amount": 300})
    assert reply.status == 200, reply.raw
    assert reply.body["features"] == expected_features("c-100")
    assert 0 < reply.body["score"] < 1


async def test_broker_killed_503_then_recovers(embedded_stack: Stack, session: aiohttp.ClientSession) -> None:
    """Broker SIGKILLed: Envoy answers 503 broker_unavailable at once; broker back: 200."""
    broker = embedded_stack.procs["broker"]
    broker.kill()
    try:
        started = time.monotonic()
        reply = await call(session, embedded_stack.base + PATH, {"customer_id": "c-1"})
        assert time.monotonic() - started < 3.0
        assert reply.status == 503, reply.raw
        assert reply.error_code() == "broker_unavailable"
        assert "ext_proc" not in reply.raw.decode()
        health = await call(session, embedded_stack.base + "/healthz", method="GET")
        assert health.status == 503 and health.error_code() == "broker_unavailable"
    finally:
        embedded_stack.start_broker()
    deadline = time.monotonic() + 10
    while (reply := await call(session, embedded_stack.base + PATH, {"customer_id": "c-1"})).status != 200:
        assert time.monotonic() < deadline, reply.raw
        await asyncio.sleep(0.2)
    assert reply.body["features"] == expected_features("c-1")


async def test_broker_stalled_503_within_the_message_timeout(
    embedded_stack: Stack, session: aiohttp.ClientSession
) -> None:
    """Broker frozen (SIGSTOP): Envoy gives up at `broker.message_timeout_ms` with 503 JSON; thawed: 200."""
    timeout_s = embedded_stack.doc["broker"]["message_timeout_ms"] / 1000
    embedded_stack.procs["broker"].signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        reply = await call(session, embedded_stack.base + PATH, {"customer_id": "c-1"})
        waited = time.monotonic() - started
        assert reply.status == 503, reply.raw
        assert reply.error_code() == "broker_unavailable"
        # Not before the budget, and not long after it (a loaded box adds its own delay).
        assert timeout_s * 0.9 <= waited < timeout_s + 5.0, waited
    finally:
        embedded_stack.procs["broker"].signal(signal.SIGCONT)
    deadline = time.monotonic() + 10
    while (reply := await call(session, embedded_stack.base + PATH, {"customer_id": "c-1"})).status != 200:
        assert time.monotonic() < deadline, reply.raw
        await asyncio.sleep(0.2)


async def test_sigterm_drains_and_stops_the_broker(tmp_path: Path) -> None:
    """SIGTERM to `serve`: every worker exits cleanly and promptly."""
    with run_stack(demo_registry_doc(), tmp_path) as stack:
        broker = stack.procs["broker"].popen
        assert broker is not None
        broker.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(broker.wait, 20) == 0


async def test_stage_metrics_aggregate_all_workers(redis_stack: Stack, session: aiohttp.ClientSession) -> None:
    """The Server-Timing stages are also Prometheus histograms, summed over every worker."""
    for i in range(20):
        await call(session, redis_stack.base + PATH, {"customer_id": f"c-{i + 1}"})
    await call(session, redis_stack.base + PATH, {"amount": 1})
    async with session.get(f"http://127.0.0.1:{redis_stack.doc['metrics']['port']}/metrics") as resp:
        text = await resp.text()

    def sample(name: str, **labels: str) -> float:
        wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
        found = re.search(rf"^{name}{{{wanted}}} (\S+)$", text, re.MULTILINE)
        assert found, (name, labels)
        return float(found.group(1))

    for stage in ("route", "features", "body"):
        assert sample("model_broker_stage_seconds_count", model="credit-risk", stage=stage) >= 20
    # Labels print in alphabetical order; consumer is empty in open mode.
    assert sample("model_broker_requests_total", consumer="", model="credit-risk", outcome="ok") >= 20
    assert sample("model_broker_requests_total", consumer="", model="credit-risk", outcome="missing_entity_key") >= 1
    assert sample("model_broker_feature_cache_total", result="miss") >= 1
