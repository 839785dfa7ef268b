"""Automatic rollback through the real thing: Envoy pushes its stats, the control plane judges the canary."""

from __future__ import annotations

import asyncio
import collections
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from extproc.process.launcher import free_port
from extproc.rollout.control_plane import events_path
from extproc.rollout.discovery import TOKEN_ENV
from tests.aws import run_cli, wait_listed
from tests.conftest import Stack, demo_registry_doc, run_stack
from tests.http import call

BAD = "/v1/models/credit-risk/predict"
GOOD = "/v1/models/credit-risk-ok/predict"
PROMO = "/v1/models/credit-risk-promo/predict"
TOKEN = "rollback-test-token"
POLICY = {"canary": "v2", "window_seconds": 5, "min_requests": 10, "max_error_rate": 0.2}


@pytest.fixture(scope="module")
async def broken_canary() -> AsyncIterator[int]:
    """A model endpoint that answers every request with 500."""

    async def fail(_: web.Request) -> web.Response:
        return web.json_response({"error": "model crashed"}, status=500)

    app = web.Application()
    app.router.add_post("/endpoints/{name}/invocations", fail)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield port
    await runner.cleanup()


def rollback_registry(broken_port: int) -> dict[str, Any]:
    """credit-risk: canary v2 is the broken endpoint (a SageMaker-style backend the test serves);
    credit-risk-ok: the same policy over two healthy demo versions; credit-risk-promo: healthy,
    with staged promotion 10 → 50 → 100."""
    doc = demo_registry_doc()
    bad = doc["models"][0]
    good = json.loads(json.dumps(bad))
    good.update(name="credit-risk-ok", path=GOOD, rollout=POLICY)
    for version in good["versions"]:
        version["weight"] = 50
        version["backend"]["service"]["port"] = free_port()
    endpoint = {"endpoint": "broken", "region": "us-east-1", "endpoint_url": f"http://127.0.0.1:{broken_port}"}
    bad["versions"][1] = {
        "name": "v2",
        "weight": 50,
        "backend": {"sagemaker": {**endpoint, "credentials": ["environment"]}},
    }
    bad["versions"][0]["weight"] = 50
    bad["rollout"] = POLICY
    promo = json.loads(json.dumps(good))
    promo.update(
        name="credit-risk-promo", path=PROMO, rollout={**POLICY, "promote_steps": [50, 100], "promote_after_seconds": 2}
    )
    promo["versions"][0]["weight"], promo["versions"][1]["weight"] = 90, 10
    for version in promo["versions"]:
        version["backend"]["service"]["port"] = free_port()
    doc["models"] += [good, promo]
    return doc


@pytest.fixture(scope="module")
def rollback_stack(broken_canary: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv(TOKEN_ENV, TOKEN)
        env.setenv("AWS_ACCESS_KEY_ID", "AKIDROLLBACK")
        env.setenv("AWS_SECRET_ACCESS_KEY", "rollback-secret")
        with run_stack(rollback_registry(broken_canary), tmp_path_factory.mktemp("rollback")) as stack:
            yield stack


async def live_weights(session: aiohttp.ClientSession, stack: Stack) -> dict[str, dict[str, int]]:
    url = f"http://127.0.0.1:{stack.doc['control_plane']['admin_port']}/weights"
    async with session.get(url, headers={"authorization": f"Bearer {TOKEN}"}) as resp:
        models: dict[str, dict[str, int]] = (await resp.json())["models"]
        return models


async def test_failing_canary_is_rolled_back(rollback_stack: Stack, session: aiohttp.ClientSession) -> None:
    """A canary answering 500: weight 0 on Envoy within the window, errors stop, the event and counter record it."""
    first_error = None
    rolled_back_at = None
    deadline = time.monotonic() + 30
    i = 0
    while time.monotonic() < deadline:  # bounded: at most 30 s of 4-at-a-time requests
        replies = await asyncio.gather(
            *(call(session, rollback_stack.base + BAD, {"customer_id": f"c-{(i + k) % 100 + 1}"}) for k in range(4))
        )
        i += 4
        if first_error is None and any(r.status >= 500 for r in replies):
            first_error = time.monotonic()
        if (await live_weights(session, rollback_stack))["credit-risk"]["v2"] == 0:
            rolled_back_at = time.monotonic()
            break
    assert first_error is not None and rolled_back_at is not None, "never rolled back"
    assert rolled_back_at - first_error <= POLICY["window_seconds"] + 3
    replies = await asyncio.gather(
        *(call(session, rollback_stack.base + BAD, {"customer_id": f"c-{k + 1}"}) for k in range(100))
    )
    assert collections.Counter((r.status, r.headers.get("x-broker-version")) for r in replies) == {(200, "v1"): 100}

    events = [
        json.loads(line)
        for line in events_path(str(rollback_stack.workdir / "rollout-state.json")).read_text().splitlines()
    ]
    (rollback,) = [e for e in events if e["event"] == "rollback"]
    assert rollback["model"] == "credit-risk" and rollback["canary"] == "v2" and rollback["reason"] == "error_rate"
    assert rollback["after"] == {"v1": 50, "v2": 0}
    assert rollback["requests"] >= POLICY["min_requests"] and rollback["error_rate"] > POLICY["max_error_rate"]
    # The same rollback, reason and all, in the audit trail beside the model's executions.
    config = str(rollback_stack.config)
    listed = await wait_listed(config, "credit-risk", lambda ss: any(s.get("event") == "rollback" for s in ss))
    (listed,) = [s for s in listed if s.get("event") == "rollback"]
    shown = await asyncio.to_thread(run_cli, "audit", "show", listed["request_id"], "--config", config)
    assert shown.returncode == 0, shown.stderr
    audited = json.loads(shown.stdout)
    assert audited["kind"] == "rollout" and audited["rollout"]["reason"] == "error_rate"
    assert audited["rollout"]["after"] == {"v1": 50, "v2": 0} and audited["rollout"]["source"] == "rollback"
    async with session.get(f"http://127.0.0.1:{rollback_stack.doc['metrics']['port']}/metrics") as resp:
        text = await resp.text()
    found = re.search(
        r'^model_broker_rollbacks_total\{model="credit-risk",reason="error_rate",version="v2"\} (\S+)$', text, re.M
    )
    assert found and float(found.group(1)) == 1.0, text[-2000:]


async def test_healthy_canary_stays(rollback_stack: Stack, session: aiohttp.ClientSession) -> None:
    """A canary answering well under the same policy keeps its weight through more than a window of traffic."""
    started = time.monotonic()
    statuses: collections.Counter[int] = collections.Counter()
    while time.monotonic() - started < POLICY["window_seconds"] + 2:
        replies = await asyncio.gather(
            *(call(session, rollback_stack.base + GOOD, {"customer_id": f"c-{k + 1}"}) for k in range(4))
        )
        statuses.update(r.status for r in replies)
    assert statuses.keys() == {200} and statuses[200] >= POLICY["min_requests"] * 2
    assert (await live_weights(session, rollback_stack))["credit-risk-ok"] == {"v1": 50, "v2": 50}
    async with session.get(f"http://127.0.0.1:{rollback_stack.doc['metrics']['port']}/metrics") as resp:
        text = await resp.text()
    judged = re.search(
        r'^model_broker_version_requests_total\{model="credit-risk-ok",version="v2"\} (\S+)$', text, re.M
    )
    assert judged and float(judged.group(1)) >= POLICY["min_requests"]  # the canary was judged, not ignored


async def test_healthy_canary_is_promoted_in_stages(rollback_stack: Stack, session: aiohttp.ClientSession) -> None:
    """A healthy canary with promotion steps [50, 100] reaches 100% through 50%, each step after its hold."""
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:  # bounded: at most 40 s of 4-at-a-time requests
        replies = await asyncio.gather(
            *(call(session, rollback_stack.base + PROMO, {"customer_id": f"c-{k + 1}"}) for k in range(4))
        )
        assert all(r.status == 200 for r in replies)
        if (await live_weights(session, rollback_stack))["credit-risk-promo"]["v2"] == 100:
            break
    assert (await live_weights(session, rollback_stack))["credit-risk-promo"] == {"v1": 0, "v2": 100}
    events = [
        json.loads(line)
        for line in events_path(str(rollback_stack.workdir / "rollout-state.json")).read_text().splitlines()
    ]
    steps = [e for e in events if e["model"] == "credit-risk-promo"]
    assert [(e["event"], e["percent"], e["after"]) for e in steps] == [
        ("promotion", 50, {"v1": 50, "v2": 50}),
        ("promotion", 100, {"v1": 0, "v2": 100}),
    ]
    assert steps[1]["time"] - steps[0]["time"] >= 2
