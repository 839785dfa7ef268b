"""Ensembles through a real Envoy, the broker, real Redis and the demo models: what a client sees.

Members are steered with the demo models' `_demo` field (delay, status, answer
fields), which the broker passes through like any consumer field.
"""

from __future__ import annotations

import asyncio
import collections
import re
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest

from extproc.process.launcher import free_port
from tests.conftest import RedisServer, Stack, demo_registry_doc, demo_rows, run_stack
from tests.http import Reply, call

CREDIT_FEATURES = {"income", "debt_ratio", "tenure_months"}
FRAUD_FEATURES = ("late_payments_12m", "segment", "debt_ratio")
TRIO = ["credit-risk", "fraud", "affordability"]


def ensemble(name: str, members: list[str], timeout_ms: int = 2000, **fields: Any) -> dict[str, Any]:
    return {
        "name": name,
        "path": f"/v1/ensembles/{name}/predict",
        "members": [{"model": m, "timeout_ms": timeout_ms} for m in members],
        "deadline_ms": 3000,
        **fields,
    }


def ensembles_registry(redis_url: str) -> dict[str, Any]:
    """The demo (credit-risk 80/20, fraud, underwriting) plus a third model and one ensemble per behaviour."""
    # A generous store budget, so a paused Redis (test_deadline_…) is slow rather than down.
    doc = demo_registry_doc(
        feature_store={"redis": {"url": redis_url}, "timeout_ms": 1000, "cache": {"ttl_seconds": 0}},
    )
    doc["broker"]["message_timeout_ms"] = 1500
    doc["models"].append(
        {
            "name": "affordability",
            "path": "/v1/models/affordability/predict",
            "entity": "customer",
            "features": ["income"],
            "versions": [
                {"name": "v1", "weight": 1, "backend": {"service": {"host": "127.0.0.1", "port": free_port()}}}
            ],
        }
    )
    partial = ensemble("partial", ["credit-risk", "fraud"], min_success=1)
    partial["members"][1]["timeout_ms"] = 300
    # The deadline equals the member timeouts: only time spent before the fan-out makes it bite.
    tight = ensemble("tight", ["credit-risk", "fraud"], timeout_ms=1500, deadline_ms=1500, min_success=1)
    doc["ensembles"] += [
        partial,
        tight,
        ensemble("trio", TRIO),
        ensemble("mean", TRIO, aggregation={"method": "mean", "field": "score"}),
        ensemble("weighted", TRIO, aggregation={"method": "weighted_mean", "field": "score"}),
        ensemble("vote", TRIO, aggregation={"method": "majority_vote", "field": "label"}),
        ensemble("first", TRIO, min_success=1, aggregation={"method": "first_success", "field": "score"}),
    ]
    doc["ensembles"][-3]["members"][0]["weight"] = 3
    return doc


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with run_stack(ensembles_registry(redis_server.url), tmp_path_factory.mktemp("ensembles")) as running:
        yield running


async def ask(session: aiohttp.ClientSession, stack: Stack, name: str, customer: str = "c-7", **demo: Any) -> Reply:
    body: dict[str, Any] = {"customer_id": customer, "amount": 1200}
    if demo:
        body["_demo"] = demo
    return await call(session, f"{stack.base}/v1/ensembles/{name}/predict", body)


async def envoy_counter(session: aiohttp.ClientSession, stack: Stack, name: str) -> int:
    async with session.get(f"{stack.admin}/stats?filter=^{re.escape(name)}$") as resp:
        found = re.search(r": (\d+)$", await resp.text(), re.MULTILINE)
    return int(found.group(1)) if found else 0


async def test_all_members_answer_with_their_versions_and_features(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    """underwriting: 200, every member's answer, the version Envoy chose for it, its own features only."""
    reply = await ask(session, stack, "underwriting")
    assert reply.status == 200, reply.raw
    results = reply.body["results"]
    assert set(results) == {"credit-risk", "fraud"} and reply.body["errors"] == {}
    for model, result in results.items():
        assert result["output"]["model"] == model
        assert result["version"] == result["output"]["version"]  # from Envoy's x-broker-version on egress
        assert result["latency_ms"] > 0
    row = demo_rows()["customer:c-7"]
    assert results["fraud"]["output"]["features"] == {name: row[name] for name in FRAUD_FEATURES}
    assert set(results["credit-risk"]["output"]["features"]) >= CREDIT_FEATURES
    assert "segment" not in results["credit-risk"]["output"]["features"]
    scores = {m: r["output"]["score"] for m, r in results.items()}
    combined = reply.body["combined"]
    assert combined["value"] == pytest.approx((2 * scores["credit-risk"] + scores["fraud"]) / 3)


async def test_features_fetched_once_per_request(
    stack: Stack, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    """Three members, one Redis HMGET per ensemble request (cache off), counted by Redis itself."""

    def hmget_calls() -> int:
        found = re.search(r"cmdstat_hmget:calls=(\d+)", redis_server.cli("INFO", "commandstats"))
        return int(found.group(1)) if found else 0

    before = hmget_calls()
    for customer in ("c-1", "c-2"):
        reply = await ask(session, stack, "trio", customer)
        assert reply.status == 200, reply.raw
        assert set(reply.body["results"]) == set(TRIO)
    assert hmget_calls() - before == 2


async def test_slow_member_times_out_is_cancelled_and_others_answer(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    """A member slower than its timeout: its error entry, the rest answered, its call torn down in Envoy."""
    torn_down = "cluster.fraud--v1.upstream_cx_destroy_local_with_active_rq"
    before = await envoy_counter(session, stack, torn_down)
    started = time.monotonic()
    reply = await ask(session, stack, "partial", fraud={"delay_ms": 5000})
    assert time.monotonic() - started < 3.0  # bounded by the 300 ms member timeout, not the 5 s delay
    assert reply.status == 200, reply.raw
    assert set(reply.body["results"]) == {"credit-risk"}
    assert reply.body["errors"]["fraud"] == {"code": "upstream_timeout", "message": "no answer within 300 ms"}
    deadline = time.monotonic() + 5
    while await envoy_counter(session, stack, torn_down) == before:
        assert time.monotonic() < deadline, "Envoy never reset the timed-out member's request"
        await asyncio.sleep(0.1)


async def test_deadline_cancels_members_still_running(
    stack: Stack, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    """Redis paused 500 ms eats the budget: at the deadline a still-running member is cut, the other answered."""
    redis_server.cli("CLIENT", "PAUSE", "500", "ALL")
    started = time.monotonic()
    reply = await ask(session, stack, "tight", fraud={"delay_ms": 5000})
    assert time.monotonic() - started < 4.0  # the 1.5 s deadline, not the 5 s delay
    assert reply.status == 200, reply.raw
    assert set(reply.body["results"]) == {"credit-risk"}
    assert reply.body["errors"]["fraud"]["code"] == "deadline_exceeded"


async def test_member_500_is_an_error_entry(stack: Stack, session: aiohttp.ClientSession) -> None:
    """A member answering 500, with min_success 1: 200 with its error entry beside the other's result."""
    reply = await ask(session, stack, "partial", fraud={"status": 500})
    assert reply.status == 200, reply.raw
    assert set(reply.body["results"]) == {"credit-risk"}
    assert reply.body["errors"]["fraud"] == {"code": "upstream_error", "message": "the model answered HTTP 500"}


async def test_too_few_successes_is_502_json(stack: Stack, session: aiohttp.ClientSession) -> None:
    """underwriting needs both: one 500 makes it 502 with the same body plus the error shape."""
    reply = await ask(session, stack, "underwriting", fraud={"status": 500})
    assert reply.status == 502, reply.raw
    assert reply.error_code() == "ensemble_failed"
    assert reply.body["error"]["request_id"] == reply.headers["x-request-id"]
    assert set(reply.body["results"]) == {"credit-risk"} and set(reply.body["errors"]) == {"fraud"}
    assert reply.body["combined"] is None


async def test_too_few_successes_by_timeout_is_504(stack: Stack, session: aiohttp.ClientSession) -> None:
    """underwriting needs both; one timing out makes it 504 ensemble_timeout."""
    reply = await ask(session, stack, "underwriting", fraud={"delay_ms": 5000})
    assert reply.status == 504, reply.raw
    assert reply.error_code() == "ensemble_timeout"
    assert reply.body["errors"]["fraud"]["code"] == "upstream_timeout"


async def test_weighted_split_applies_to_members(stack: Stack, session: aiohttp.ClientSession) -> None:
    """Over 400 ensemble requests credit-risk's v1 share stays within ±6 points of 80 (3 standard deviations)."""
    limit = asyncio.Semaphore(16)

    async def one(i: int) -> Reply:
        async with limit:
            return await ask(session, stack, "underwriting", f"c-{i % 100 + 1}")

    replies = await asyncio.gather(*(one(i) for i in range(400)))
    assert all(r.status == 200 for r in replies), collections.Counter(r.status for r in replies)
    versions = collections.Counter(r.body["results"]["credit-risk"]["version"] for r in replies)
    # Binomial: sd = sqrt(400 * 0.8 * 0.2) = 8 requests = 2 points.
    assert 74 <= versions["v1"] / len(replies) * 100 <= 86, versions


async def test_members_are_called_concurrently(stack: Stack, session: aiohttp.ClientSession) -> None:
    """Three members taking 300 ms each answer together far sooner than the 900 ms they would take in turn."""
    started = time.monotonic()
    reply = await ask(session, stack, "trio", **{model: {"delay_ms": 300} for model in TRIO})
    elapsed = time.monotonic() - started
    assert reply.status == 200, reply.raw
    assert all(r["latency_ms"] >= 300 for r in reply.body["results"].values())
    assert elapsed < 0.65, elapsed  # in turn: >= 0.9 s; together: ~0.3 s plus overhead


KNOWN = {
    "credit-risk": {"answer": {"score": 0.2, "label": "decline"}},
    "fraud": {"answer": {"score": 0.5, "label": "approve"}},
    "affordability": {"answer": {"score": 0.8, "label": "approve"}},
}
COMBINERS: list[tuple[str, dict[str, Any], Any]] = [
    ("mean", KNOWN, 0.5),
    ("weighted", KNOWN, (3 * 0.2 + 0.5 + 0.8) / 5),
    ("vote", KNOWN, "approve"),
    ("first", {**KNOWN, "credit-risk": {"status": 500}}, 0.5),
]


@pytest.mark.parametrize(("name", "demo", "value"), COMBINERS, ids=[c[0] for c in COMBINERS])
async def test_combiner_on_known_outputs(
    stack: Stack, session: aiohttp.ClientSession, name: str, demo: dict[str, Any], value: Any
) -> None:
    """Each declared combiner over members steered to known answers."""
    reply = await ask(session, stack, name, **demo)
    assert reply.status == 200, reply.raw
    assert reply.body["combined"]["value"] == pytest.approx(value)


async def test_combiner_over_non_numeric_field_is_502_naming_it(stack: Stack, session: aiohttp.ClientSession) -> None:
    """mean over `score` when fraud answers a string: 502 JSON naming the field and the member."""
    reply = await ask(session, stack, "mean", **{**KNOWN, "fraud": {"answer": {"score": "high"}}})
    assert reply.status == 502, reply.raw
    assert reply.error_code() == "aggregation_failed"
    assert "mean over 'score'" in reply.body["error"]["message"]
    assert 'fraud answered "high"' in reply.body["error"]["message"]
    assert set(reply.body["results"]) == set(TRIO)


BAD: list[tuple[str, dict[str, Any], int, str]] = [
    ("missing-key", {"data": b'{"amount": 5}'}, 400, "missing_entity_key"),
    ("unknown-entity", {"data": b'{"customer_id": "c-404"}'}, 404, "unknown_entity"),
    ("no-body", {"data": None}, 400, "invalid_json"),
    ("get", {"data": None, "method": "GET"}, 405, "method_not_allowed"),
]


@pytest.mark.parametrize(("case", "args", "status", "code"), BAD, ids=[b[0] for b in BAD])
async def test_bad_ensemble_request_is_json_error_without_member_calls(
    stack: Stack, session: aiohttp.ClientSession, case: str, args: dict[str, Any], status: int, code: str
) -> None:
    """Bad input to an ensemble gets the model routes' errors, and no member is called."""
    calls = "http.egress.downstream_rq_total"
    before = await envoy_counter(session, stack, calls)
    reply = await call(session, f"{stack.base}/v1/ensembles/underwriting/predict", **args)
    assert reply.status == status, reply.raw
    assert reply.error_code() == code
    assert await envoy_counter(session, stack, calls) == before


async def test_each_member_call_is_audited_under_the_clients_request_id(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    """One audit record per member, linked by parent_request_id, with its version, features and outcome."""
    reply = await ask(session, stack, "partial", fraud={"delay_ms": 600})
    assert reply.status == 200, reply.raw
    parent = reply.headers["x-request-id"]
    records: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 20
    while len(records) < 2:
        assert time.monotonic() < deadline, records
        await asyncio.sleep(0.3)
        for path in (stack.workdir / "audit-records").glob("date=*/model=*/*.jsonl"):
            for line in path.read_text().splitlines():
                record = orjson.loads(line)
                if record["parent_request_id"] == parent:
                    records[record["model"]] = record
    credit, fraud = records["credit-risk"], records["fraud"]
    assert credit["version"] == reply.body["results"]["credit-risk"]["version"]
    assert credit["response"]["status"] == 200 and credit["error_code"] is None
    assert credit["response"]["body"] == reply.body["results"]["credit-risk"]["output"]
    assert credit["features"] == credit["response"]["body"]["features"]
    assert credit["request_id"] != parent and credit["entity"]["key"] == "c-7"
    assert fraud["error_code"] == reply.body["errors"]["fraud"]["code"] == "upstream_timeout"
    assert fraud["response"]["status"] is None
