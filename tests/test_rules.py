"""Derived features and segment rules through the real stack: Envoy, broker, Redis, demo models.

The demo models echo the features they received, and Envoy reports the version that answered
(`x-broker-version`), so each test reads what reached the model and where it went.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import re
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import yaml

from extproc.process.launcher import free_port
from extproc.rollout.client import request as admin_request
from extproc.rollout.discovery import RUNTIME_DIR_ENV, TOKEN_ENV, AdminEndpoint
from tests.conftest import RedisServer, Stack, demo_registry_doc, demo_rows, run_stack
from tests.http import Reply, call
from tests.test_audit_dataplane import run_cli

TOKEN = "rules-test-token"
PATH = "/v1/models/credit-risk/predict"
POLICIES = ("reject", "forward_degraded", "null")


def service(port: int) -> dict[str, Any]:
    return {"service": {"host": "127.0.0.1", "port": port, "path": "/predict"}}


def rules_doc(redis_url: str) -> dict[str, Any]:
    """The demo registry on Redis; credit-risk gains derived features, rules and a rules-only v3;
    one extra (audited) model per missing-features policy, each with a derived feature that can fail."""
    doc = demo_registry_doc(
        feature_store={"redis": {"url": redis_url}, "timeout_ms": 1000, "cache": {"ttl_seconds": 0.5}}
    )
    doc["broker"]["message_timeout_ms"] = 1500
    # The demo's underwriting ensemble (credit-risk and fraud) stays: members get derived features too.
    credit = doc["models"][0]
    # Not audited: a single-message route; the audited ratio-* models below send two messages
    # (request and response), both on the suite's transport.
    credit["audit"] = False
    credit["features"] = ["income", "debt_ratio", "tenure_months", "segment"]
    credit["versions"].append({"name": "v3", "weight": 0, "backend": service(free_port())})
    credit["derived"] = [
        {"name": "debt", "expr": "features.debt_ratio * features.income"},
        {"name": "amount_over_income", "expr": "body.amount / features.income"},
        {"name": "high_debt", "expr": "features.debt > 50000.0", "type": "bool"},
    ]
    credit["rules"] = [
        {"name": "germany", "when": "has(body.country) && body.country == 'DE'", "version": "v2"},
        {"name": "business", "when": "features.segment == 'business'", "version": "v3"},
        {"name": "experiment", "when": "body.amount > 100000.0", "split": {"v1": 50, "v3": 50}},
    ]
    template = doc["models"][1]
    sticky = copy.deepcopy(template)
    sticky.update(
        name="sticky-split",
        path="/v1/models/sticky-split/predict",
        audit=False,
        sticky={"header": "x-user-id"},
        rules=[{"name": "everyone", "when": "true", "split": {"v1": 50, "v2": 50}}],
    )
    sticky["versions"] = [
        {"name": "v1", "weight": 100, "backend": service(free_port())},
        {"name": "v2", "weight": 0, "backend": service(free_port())},
    ]
    doc["models"].append(sticky)
    for policy in POLICIES:
        model = copy.deepcopy(template)
        model.update(
            name=f"ratio-{policy.replace('_', '-')}",
            path=f"/v1/models/ratio-{policy}/predict",
            missing_features=policy,
            derived=[{"name": "ratio", "expr": "body.amount / body.divisor"}],
            rules=[{"name": "large", "when": "body.amount > 1000.0", "version": "v1"}],
        )
        model["versions"] = [{"name": "v1", "weight": 100, "backend": service(free_port())}]
        doc["models"].append(model)
    return doc


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv(RUNTIME_DIR_ENV, str(tmp_path_factory.mktemp("runtime")))
        env.setenv(TOKEN_ENV, TOKEN)
        with run_stack(rules_doc(redis_server.url), tmp_path_factory.mktemp("rules")) as running:
            yield running


def customer(segment: str) -> str:
    """A seeded customer of that segment (the demo rows are on the test's Redis)."""
    for key, row in demo_rows().items():
        if row.get("segment") == segment:
            return key.removeprefix("customer:")
    raise AssertionError(f"no demo customer in segment {segment}")


async def predict(session: aiohttp.ClientSession, stack: Stack, body: dict[str, Any], path: str = PATH) -> Reply:
    return await call(session, stack.base + path, body)


async def test_derived_values_reach_the_model(stack: Stack, session: aiohttp.ClientSession) -> None:
    """Derived features arrive beside the stored ones, computed from the body and the fetched features."""
    reply = await predict(session, stack, {"customer_id": customer("retail"), "amount": 1200})
    assert reply.status == 200, reply.raw
    features = reply.body["features"]
    assert features["debt"] == pytest.approx(features["debt_ratio"] * features["income"])
    assert features["amount_over_income"] == pytest.approx(1200 / features["income"])
    assert features["high_debt"] is (features["debt"] > 50000)
    assert "x-broker-degraded" not in reply.headers
    assert re.search(r"broker-rules;dur=[0-9.]+", reply.headers["server-timing"]), reply.headers


async def test_ensemble_members_get_their_derived_features(stack: Stack, session: aiohttp.ClientSession) -> None:
    """A model called as an ensemble member receives its derived features too (its rules do not apply there)."""
    reply = await call(session, stack.base + "/v1/ensembles/underwriting/predict", {"customer_id": "c-1", "amount": 1})
    assert reply.status == 200, reply.raw
    features = reply.body["results"]["credit-risk"]["output"]["features"]
    assert features["debt"] == pytest.approx(features["debt_ratio"] * features["income"])
    assert features["amount_over_income"] == pytest.approx(1 / features["income"])


async def test_rule_on_the_body_pins_its_version(stack: Stack, session: aiohttp.ClientSession) -> None:
    """A body that matches the first rule always lands on its version, whatever the weights say."""
    body = {"customer_id": customer("retail"), "amount": 10, "country": "DE"}
    versions = {(await predict(session, stack, body)).headers["x-broker-version"] for _ in range(30)}
    assert versions == {"v2"}


async def test_rule_on_a_fetched_feature_pins_its_version(stack: Stack, session: aiohttp.ClientSession) -> None:
    """The segment comes from the feature store; a rules-only version (weight 0) gets exactly that slice."""
    body = {"customer_id": customer("business"), "amount": 10}
    replies = [await predict(session, stack, body) for _ in range(30)]
    assert {r.headers["x-broker-version"] for r in replies} == {"v3"}
    assert all(r.body["features"]["segment"] == "business" for r in replies)


async def test_no_match_follows_the_live_weights(stack: Stack, session: aiohttp.ClientSession) -> None:
    """No rule holds: Envoy's weighted split decides (80/20 v1/v2), and the rules-only v3 gets nothing."""
    body = {"customer_id": customer("retail"), "amount": 10}
    seen = collections.Counter([(await predict(session, stack, body)).headers["x-broker-version"] for _ in range(200)])
    assert set(seen) == {"v1", "v2"}, seen
    assert 60 <= seen["v1"] / 2 <= 95, seen


async def test_sub_split_within_tolerance(stack: Stack, session: aiohttp.ClientSession) -> None:
    """A rule's sub-split {v1: 50, v3: 50} over 2,000 requests: each side within 50 ± 5 %."""
    limit = asyncio.Semaphore(16)
    body = {"customer_id": customer("retail"), "amount": 200000}

    async def one() -> str:
        async with limit:
            reply = await predict(session, stack, body)
            assert reply.status == 200, reply.raw
            return reply.headers["x-broker-version"]

    seen = collections.Counter(await asyncio.gather(*(one() for _ in range(2000))))
    assert set(seen) == {"v1", "v3"}, seen
    assert 45 <= seen["v3"] / 20 <= 55, seen  # ±4.5 standard deviations of a fair 50/50 over 2,000


async def test_sub_split_keeps_a_sticky_user_on_one_version(stack: Stack, session: aiohttp.ClientSession) -> None:
    """On a model sticky by header, a rule's sub-split hashes the same header: each user keeps one version."""
    seen: dict[str, set[str]] = collections.defaultdict(set)
    for i in range(120):
        user = f"user-{i % 40}"
        headers = {"content-type": "application/json", "x-user-id": user}
        reply = await call(
            session, stack.base + "/v1/models/sticky-split/predict", {"customer_id": "c-1"}, headers=headers
        )
        assert reply.status == 200, reply.raw
        seen[user].add(reply.headers["x-broker-version"])
    assert all(len(versions) == 1 for versions in seen.values()), seen
    assert {next(iter(v)) for v in seen.values()} == {"v1", "v2"}  # the split still splits users


async def test_a_rolled_back_version_is_never_chosen(stack: Stack, session: aiohttp.ClientSession) -> None:
    """v2 rolled back (live weight 0): the rule naming it falls to the live split, which is all v1."""
    admin = AdminEndpoint(f"http://127.0.0.1:{stack.doc['control_plane']['admin_port']}", TOKEN, 0, "")
    body = {"customer_id": customer("retail"), "amount": 10, "country": "DE"}
    status, answer = await asyncio.to_thread(
        admin_request, admin, "PUT", "/weights/credit-risk", {"weights": {"v1": 100, "v2": 0, "v3": 0}}
    )
    assert status == 200, answer
    try:

        async def every_worker_withdrew() -> bool:
            replies = [await predict(session, stack, body) for _ in range(12)]
            return all(r.headers["x-broker-version"] == "v1" for r in replies)

        for _ in range(60):
            if await every_worker_withdrew():
                break
            await asyncio.sleep(0.25)
        versions = {(await predict(session, stack, body)).headers["x-broker-version"] for _ in range(40)}
        assert versions == {"v1"}
        # The rules-only v3 (declared at 0) is not "rolled back": its rule still reaches it.
        business = {"customer_id": customer("business"), "amount": 10}
        assert (await predict(session, stack, business)).headers["x-broker-version"] == "v3"
        metrics = await metrics_text(session, stack)
        assert re.search(
            r'model_broker_rules_total\{model="credit-risk",outcome="withdrawn",rule="germany"\} [1-9]', metrics
        )
    finally:
        status, answer = await asyncio.to_thread(
            admin_request, admin, "PUT", "/weights/credit-risk", {"weights": {"v1": 80, "v2": 20, "v3": 0}}
        )
        assert status == 200, answer


async def metrics_text(session: aiohttp.ClientSession, stack: Stack) -> str:
    async with session.get(f"http://127.0.0.1:{stack.doc['metrics']['port']}/metrics") as resp:
        return await resp.text()


@pytest.mark.parametrize(
    ("body", "cause"),
    [
        ({"amount": 10, "divisor": 0}, "the result is inf"),
        ({"amount": 10}, 'missing input: \\"divisor\\"'),
        ({"amount": 10, "divisor": "two"}, "type mismatch"),
    ],
    ids=["division-by-zero", "missing-input", "type-mismatch"],
)
@pytest.mark.parametrize("policy", POLICIES)
async def test_runtime_errors_follow_the_policy(
    stack: Stack, session: aiohttp.ClientSession, policy: str, body: dict[str, Any], cause: str
) -> None:
    """A derived feature that fails: 422 naming it (reject), sent without it (degraded), or as null."""
    reply = await predict(
        session, stack, {"customer_id": customer("retail"), **body}, f"/v1/models/ratio-{policy}/predict"
    )
    if policy == "reject":
        assert reply.status == 422, reply.raw
        assert reply.error_code() == "missing_features"
        message = reply.body["error"]["message"]
        assert "'ratio'" in message and "`body.amount / body.divisor`" in message, message
        assert cause.replace("\\", "") in message, message
    elif policy == "forward_degraded":
        assert reply.status == 200, reply.raw
        assert reply.headers["x-broker-degraded"] == "missing-features"
        assert "ratio" not in reply.body["features"]
    else:
        assert reply.status == 200, reply.raw
        assert reply.body["features"]["ratio"] is None
        assert "x-broker-degraded" not in reply.headers


async def test_models_lists_derived_features_and_rules(stack: Stack, session: aiohttp.ClientSession) -> None:
    """GET /models shows each model's derived features, rules and missing-features policy."""
    models = {m["name"]: m for m in (await call(session, stack.base + "/models", method="GET")).body["models"]}
    credit = models["credit-risk"]
    assert credit["derived"][0] == {"name": "debt", "expr": "features.debt_ratio * features.income", "type": "double"}
    assert credit["rules"][2] == {"name": "experiment", "when": "body.amount > 100000.0", "split": {"v1": 50, "v3": 50}}
    assert models["ratio-null"]["missing_features"] == "null"


async def test_audit_record_has_derived_values_and_the_rule(stack: Stack, session: aiohttp.ClientSession) -> None:
    """The audit record keeps the derived values and which rule decided."""
    body = {"customer_id": customer("retail"), "amount": 5000, "divisor": 4}
    reply = await predict(session, stack, body, "/v1/models/ratio-null/predict")
    assert reply.status == 200, reply.raw
    request_id = reply.headers["x-request-id"]
    record: dict[str, Any] = {}
    for _ in range(60):
        shown = await asyncio.to_thread(run_cli, "audit", "show", request_id, "--config", str(stack.config))
        if shown.returncode == 0:
            record = yaml.safe_load(shown.stdout)
            break
        await asyncio.sleep(0.25)
    assert record, "the record never reached the sink"
    assert record["derived"] == {"values": {"ratio": 1250.0}, "errors": {}}
    assert record["rule"] == {"name": "large", "outcome": "matched", "version": "v1", "errors": {}}
    assert record["version"] == "v1"
    assert record["features"]["ratio"] == reply.body["features"]["ratio"] == 1250.0


async def eventually(check: Any, timeout_s: float = 20.0) -> None:
    """Poll an async check until it holds; each worker re-reads the registry file once a second."""
    for _ in range(int(timeout_s / 0.25)):
        if await check():
            return
        await asyncio.sleep(0.25)
    assert await check()


async def test_rules_reload_and_a_bad_expression_is_refused(stack: Stack, session: aiohttp.ClientSession) -> None:
    """An edited rule goes live without a restart; an edit with a bad expression is refused, logged, and the
    rules being served stay."""
    german = {"customer_id": customer("retail"), "amount": 10, "country": "DE"}
    log = stack.procs["broker"].log
    seen = log.read_text().count("unknown feature 'segmnt'")

    def rewrite(change: Any) -> None:
        doc = copy.deepcopy(stack.doc)
        change(doc["models"][0])
        stack.config.write_text(yaml.safe_dump(doc, sort_keys=False))

    try:
        rewrite(lambda m: m["rules"][1].update(when="features.segmnt == 'business'"))

        async def refused() -> bool:
            return log.read_text().count("unknown feature 'segmnt'") >= seen + 2  # every worker, at least

        await eventually(refused)
        assert {(await predict(session, stack, german)).headers["x-broker-version"] for _ in range(10)} == {"v2"}

        rewrite(lambda m: m["rules"][0].update(version="v3"))

        async def moved() -> bool:
            replies = [await predict(session, stack, german) for _ in range(8)]
            return all(r.headers["x-broker-version"] == "v3" for r in replies)

        await eventually(moved)
    finally:
        stack.config.write_text(yaml.safe_dump(stack.doc, sort_keys=False))  # back to what the other tests expect

    async def restored() -> bool:
        replies = [await predict(session, stack, german) for _ in range(8)]
        return all(r.headers["x-broker-version"] == "v2" for r in replies)

    await eventually(restored)
