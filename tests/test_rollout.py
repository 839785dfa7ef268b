"""Live weights through the real thing: one broker, its control plane, and TWO Envoy processes."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from extproc.process.launcher import envoy_binary, free_port, wait_ready
from extproc.rollout.discovery import RUNTIME_DIR_ENV, TOKEN_ENV, AdminEndpoint, announce
from tests.conftest import Proc, Stack, demo_registry_doc, run_stack
from tests.http import call

PATH = "/v1/models/credit-risk/predict"
TOKEN = "test-admin-token"


@dataclass
class Envoy:
    """A second Envoy from the same generated bootstrap, on its own listener and admin ports."""

    proc: Proc
    config: Path
    base: str

    def start(self) -> None:
        self.proc.start()
        wait_ready(self.base + "/healthz")

    def restart(self) -> None:
        self.proc.stop()
        self.start()


def second_envoy(stack: Stack) -> Envoy:
    doc = yaml.safe_load((stack.workdir / "envoy.yaml").read_text())
    port = free_port()
    doc["staticResources"]["listeners"][0]["address"]["socketAddress"]["portValue"] = port
    doc["admin"]["address"]["socketAddress"]["portValue"] = free_port()
    config = stack.workdir / "envoy2.yaml"
    config.write_text(yaml.safe_dump(doc))
    cmd = [envoy_binary(), "-c", str(config), "--log-level", "warn", "--disable-hot-restart", "--service-node", "e2"]
    envoy = Envoy(Proc("envoy2", cmd, stack.workdir / "envoy2.log"), config, f"http://127.0.0.1:{port}")
    stack.procs["envoy2"] = envoy.proc
    envoy.start()
    return envoy


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Envoy]]:
    """The demo stack plus a second Envoy; the control plane announces itself in a private runtime dir."""
    runtime = tmp_path_factory.mktemp("runtime")
    with pytest.MonkeyPatch.context() as env:
        env.setenv(RUNTIME_DIR_ENV, str(runtime))
        env.setenv(TOKEN_ENV, TOKEN)
        with run_stack(demo_registry_doc(), tmp_path_factory.mktemp("fleet")) as stack:
            yield stack, second_envoy(stack)


def weights_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`model-broker weights ...` as an operator runs it: no --admin, the local broker is found."""
    cmd = [sys.executable, "-m", "extproc.cli", "weights", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False, env=env)


async def versions(session: aiohttp.ClientSession, base: str, count: int) -> collections.Counter[str]:
    """Which version answered each of `count` requests (8 at a time); any non-200 fails the test."""
    limit = asyncio.Semaphore(8)

    async def one(i: int) -> str:
        async with limit:
            reply = await call(session, base + PATH, {"customer_id": f"c-{i % 100 + 1}"})
        assert reply.status == 200, reply.raw
        return str(reply.headers["x-broker-version"])

    return collections.Counter(await asyncio.gather(*(one(i) for i in range(count))))


def share(counts: collections.Counter[str], version: str) -> float:
    return 100 * counts[version] / sum(counts.values())


async def test_weights_change_under_load_on_both_envoys(
    fleet: tuple[Stack, Envoy], session: aiohttp.ClientSession
) -> None:
    """`weights set` under load on two Envoys: zero non-2xx, and both serve the new split."""
    stack, envoy2 = fleet
    # The split before the change, from a sample big enough to judge (3 sd at 80/20, n=300: ±7 points).
    for base in (stack.base, envoy2.base):
        before = await versions(session, base, 300)
        assert 73 <= share(before, "v1") <= 87, (base, before)
    outcomes: dict[str, list[tuple[float, int, str]]] = {stack.base: [], envoy2.base: []}
    changed_at = float("inf")
    stop = asyncio.Event()

    async def load(base: str, worker: int) -> None:
        for i in range(3000):  # bounded in count as well as in time
            if stop.is_set():
                return
            started = time.monotonic()
            reply = await call(session, base + PATH, {"customer_id": f"c-{(worker * 37 + i) % 100 + 1}"})
            outcomes[base].append((started, reply.status, reply.headers.get("x-broker-version", "")))
            if min(sum(t > changed_at for t, _, _ in seen) for seen in outcomes.values()) >= 500:
                stop.set()

    tasks = [asyncio.create_task(load(base, w)) for base in outcomes for w in range(4)]
    await asyncio.sleep(1.0)
    result = await asyncio.to_thread(weights_cli, "set", "credit-risk", "v1=10", "v2=90")
    changed_at = time.monotonic()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), 30)
    stop.set()
    await asyncio.gather(*tasks)

    assert result.returncode == 0, result.stderr
    workers = stack.doc["broker"]["workers"]
    assert f"applied on 2/2 Envoys and {workers}/{workers} broker workers" in result.stdout
    for base, seen in outcomes.items():
        assert {status for _, status, _ in seen} == {200}, (base, collections.Counter(s for _, s, _ in seen))
        after = collections.Counter(v for t, _, v in seen if t > changed_at)
        assert sum(after.values()) >= 500, base
        assert 84 <= share(after, "v2") <= 96, (base, after)


async def test_live_weights_survive_envoy_and_broker_restarts(
    fleet: tuple[Stack, Envoy], session: aiohttp.ClientSession
) -> None:
    """A changed split is the control plane's, not Envoy's memory: it holds across both restarts."""
    stack, envoy2 = fleet
    result = await asyncio.to_thread(weights_cli, "set", "credit-risk", "v1=0", "v2=100")
    assert result.returncode == 0, result.stderr
    await asyncio.to_thread(envoy2.restart)
    assert await versions(session, envoy2.base, 200) == {"v2": 200}
    stack.procs["broker"].stop()
    stack.start_broker()
    await asyncio.to_thread(envoy2.restart)  # the restarted Envoy's first runtime layer comes from the new broker
    assert await versions(session, envoy2.base, 200) == {"v2": 200}
    models = await call(session, stack.base + "/models", method="GET")
    model = next(m for m in models.body["models"] if m["name"] == "credit-risk")
    assert [(v["name"], v["weight"]) for v in model["versions"]] == [("v1", 0), ("v2", 100)]


async def test_models_endpoint_shows_live_weights(fleet: tuple[Stack, Envoy], session: aiohttp.ClientSession) -> None:
    """`GET /models` through either Envoy reports the weights just set, as soon as `set` returns."""
    stack, envoy2 = fleet
    assert weights_cli("set", "credit-risk", "v1=55", "v2=45").returncode == 0
    for base in (stack.base, envoy2.base):
        models = await call(session, base + "/models", method="GET")
        model = next(m for m in models.body["models"] if m["name"] == "credit-risk")
        assert [(v["name"], v["weight"], v["traffic_percent"]) for v in model["versions"]] == [
            ("v1", 55, 55.0),
            ("v2", 45, 45.0),
        ]


BAD_SETS: list[tuple[str, list[str], str]] = [
    ("unknown-model", ["nope", "v1=1"], "no model named 'nope'"),
    ("unknown-version", ["credit-risk", "v1=50", "v3=50"], "has no version v3"),
    ("missing-version", ["credit-risk", "v1=100"], "missing: v2"),
    ("negative", ["credit-risk", "v1=-5", "v2=105"], "between 0 and"),
    ("all-zero", ["credit-risk", "v1=0", "v2=0"], "needs a weight above 0"),
    ("not-a-number", ["credit-risk", "v1=ten", "v2=90"], "whole number"),
    ("twice", ["credit-risk", "v1=10", "v1=20"], "given twice"),
]


@pytest.mark.parametrize(("case", "args", "message"), BAD_SETS, ids=[b[0] for b in BAD_SETS])
def test_bad_weights_are_refused_and_change_nothing(
    fleet: tuple[Stack, Envoy], case: str, args: list[str], message: str
) -> None:
    """Bad `weights set` input: exit 2 with a clear message, and the live weights stay as they were."""
    before = json.loads(weights_cli("show").stdout)
    result = weights_cli("set", *args)
    assert result.returncode == 2, (case, result.stdout, result.stderr)
    assert message in result.stderr, result.stderr
    after = json.loads(weights_cli("show").stdout)
    assert after["models"] == before["models"] and after["revision"] == before["revision"]


async def test_admin_api_requires_the_token(fleet: tuple[Stack, Envoy], session: aiohttp.ClientSession) -> None:
    """Without the bearer token the admin API answers 401 and changes nothing."""
    stack, _ = fleet
    url = f"http://127.0.0.1:{stack.doc['control_plane']['admin_port']}/weights/credit-risk"
    body: dict[str, Any] = {"weights": {"v1": 1, "v2": 1}}
    for headers in ({}, {"authorization": "Bearer wrong"}):
        async with session.put(url, json=body, headers=headers) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "admin_unauthorized"


def test_admin_url_reuses_the_token_the_local_broker_announced(fleet: tuple[Stack, Envoy]) -> None:
    """With a second broker announced, `--admin URL` (any loopback name) takes that broker's announced token;
    a URL this machine did not announce falls back to $MODEL_BROKER_ADMIN_TOKEN and 401 says where tokens live."""
    stack, _ = fleet
    port = stack.doc["control_plane"]["admin_port"]
    other = announce(AdminEndpoint("http://127.0.0.1:1", "another-token", os.getpid(), "/elsewhere/registry.yaml"))
    try:
        env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
        several = weights_cli("show", env=env)
        assert several.returncode == 1 and "several brokers are running" in several.stderr
        for url in (f"http://127.0.0.1:{port}", f"http://localhost:{port}/"):
            shown = weights_cli("show", "--admin", url, env=env)
            assert shown.returncode == 0, shown.stderr
            assert json.loads(shown.stdout)["models"]["credit-risk"]
        elsewhere = {**env, RUNTIME_DIR_ENV: str(stack.workdir / "no-runtime-here")}
        refused = weights_cli("show", "--admin", f"http://127.0.0.1:{port}", env=elsewhere)
        assert refused.returncode == 1 and "admin_unauthorized" in refused.stderr
        assert TOKEN_ENV in refused.stderr and "no-runtime-here" in refused.stderr
        taken = weights_cli("show", "--admin", f"http://127.0.0.1:{port}", env={**elsewhere, TOKEN_ENV: TOKEN})
        assert taken.returncode == 0, taken.stderr
    finally:
        other.unlink()
