"""Releases from a real MLflow registry, through `model-broker up` (real Envoy, broker, control plane).

MLflow's own client moves the aliases; the broker follows them: a new @challenger gets a
canary through live weights, a healthy one ends with @champion moved in MLflow, a failing
one is rolled back and tagged; registry problems change nothing that serves.
"""

from __future__ import annotations

import asyncio
import collections
import json
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from PIL import Image

from extproc.adapters.mlflow import MlflowRegistry
from extproc.process.launcher import free_port, wait_ready
from extproc.rollout.control_plane import events_path
from extproc.rollout.discovery import TOKEN_ENV
from extproc.rollout.releases import RegistryRefused, RegistryUnavailable
from tests.conftest import ROOT, Proc, demo_registry_doc, logs_of
from tests.http import Reply, call
from tests.mlflow_server import README_TRACKING_URI, MlflowServer, metric, walkthrough

PATH = "/v1/models/credit-risk/predict"
# Kept after the run (CI uploads or a person opens it): the HTML report as chromium drew it.
ARTIFACTS = ROOT / "test-artifacts"
SIZE, TO = "1200,1500", 180
TOKEN = "mlflow-test-token"
# Version N of the registry serves on 127.0.0.N (the template below); these answer 500.
BROKEN = {3}
STEPS = [20, 100]
POLICY = {
    "window_seconds": 10,
    "min_requests": 10,
    "max_error_rate": 0.2,
    "promote_steps": STEPS,
    "promote_after_seconds": 2,
}
# Poll interval 1 s, the watcher's cluster-then-route pause 2 s: traffic within ~5 s; generous on a busy box.
REACH_S = 60
# MLflow answers in milliseconds on a quiet box; a loaded CI box can take seconds.
REGISTRY_TIMEOUT_MS = 30_000
RELEASE_S = 120


@pytest.fixture(scope="module")
async def model_port() -> AsyncIterator[int]:
    """Registry version N answers on 127.0.0.N:port with its number and the features it got."""

    async def predict(request: web.Request) -> web.Response:
        number = int(request.transport.get_extra_info("sockname")[0].rsplit(".", 1)[1])  # type: ignore[union-attr]
        if number in BROKEN:
            return web.json_response({"error": "model crashed"}, status=500)
        body = await request.json()
        return web.json_response({"registry_version": number, "score": number / 10, "features": body.get("features")})

    app = web.Application()
    app.router.add_post("/predict", predict)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    for number in range(1, 6):
        await web.TCPSite(runner, f"127.0.0.{number}", port).start()
    yield port
    await runner.cleanup()


def registry_doc(mlflow_url: str, model_port: int) -> dict[str, Any]:
    """The README's model, on this test's MLflow, backends on loopback and a policy quick enough for a test."""
    (model,) = yaml.safe_load(walkthrough("registry"))["models"]
    assert model["registry"]["mlflow"]["tracking_uri"] == README_TRACKING_URI
    model["registry"]["mlflow"].update(tracking_uri=mlflow_url, timeout_ms=REGISTRY_TIMEOUT_MS)
    model["backend_template"]["service"].update(host="127.0.0.{version}", port=model_port)
    model["rollout"] = POLICY
    doc = demo_registry_doc()
    doc["broker"]["workers"] = 1
    doc["ensembles"] = []
    doc["models"] = [model]
    return doc


def chromium() -> str:
    found = shutil.which("chromium")
    assert found, "chromium is not installed: run `make check` (scripts/ensure-system-packages chromium)"
    return found


class Up:
    """`model-broker up` on a registry that follows MLflow."""

    def __init__(self, doc: dict[str, Any], workdir: Path) -> None:
        self.doc, self.workdir = doc, workdir
        self.config = workdir / "registry.yaml"
        self.config.write_text(yaml.safe_dump(doc, sort_keys=False))
        cmd = [sys.executable, "-m", "extproc.cli", "up", "--config", str(self.config), "--workers", "1"]
        self.proc = Proc("up", cmd, workdir / "up.log")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.doc['listener']['port']}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.doc['control_plane']['admin_port']}"

    def events(self) -> list[dict[str, Any]]:
        path = events_path(str(self.workdir / "rollout-state.json"))
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def up(mlflow: MlflowServer, model_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    stack = Up(registry_doc(mlflow.url, model_port), tmp_path_factory.mktemp("up"))
    with pytest.MonkeyPatch.context() as env:
        env.setenv(TOKEN_ENV, TOKEN)
        stack.proc.start()
    try:
        wait_ready(stack.base + "/healthz", timeout_s=120)
        yield stack
    except BaseException:
        print(logs_of([stack.proc, mlflow.proc]))
        raise
    finally:
        stack.proc.stop()


async def burst(session: aiohttp.ClientSession, up: Up, n: int = 16) -> list[Reply]:
    return list(await asyncio.gather(*(call(session, up.base + PATH, {"customer_id": f"c-{k + 1}"}) for k in range(n))))


async def admin_status(session: aiohttp.ClientSession, up: Up) -> dict[str, Any]:
    async with session.get(up.admin + "/weights", headers={"authorization": f"Bearer {TOKEN}"}) as resp:
        doc: dict[str, Any] = await resp.json()
        return doc


async def until_served(session: aiohttp.ClientSession, up: Up, version: str) -> list[Reply]:
    """Send traffic until every answer of a burst comes from `version`; bounded by REACH_S."""
    deadline = time.monotonic() + REACH_S
    while time.monotonic() < deadline:
        replies = await burst(session, up)
        if all(r.status == 200 and r.headers.get("x-broker-version") == version for r in replies):
            return replies
        await asyncio.sleep(0.2)
    raise AssertionError(
        f"{version} never served alone: {[(r.status, r.headers.get('x-broker-version')) for r in replies]}"
    )


async def test_mlflow_adapter_speaks_the_rest_api(mlflow: MlflowServer) -> None:
    """The broker's aiohttp client reads and moves aliases and tags; refusals and outages become our errors."""
    registry = MlflowRegistry(mlflow.url, REGISTRY_TIMEOUT_MS)
    try:
        with pytest.raises(RegistryRefused) as unknown:
            await registry.aliases("adapter-check")
        assert unknown.value.code == "RESOURCE_DOES_NOT_EXIST"
        number = mlflow.client("register", "adapter-check", "late")["version"]
        await registry.set_alias("adapter-check", "champion", number)
        assert await registry.aliases("adapter-check") == {"champion": number}
        await registry.set_tag("adapter-check", number, "model_broker.promoted", "yes")
        found = await registry.version("adapter-check", number)
        assert found.status == "READY" and found.tags["model_broker.promoted"] == "yes"
        assert found.tags["model_broker.features"] == "late"
        with pytest.raises(RegistryRefused):
            await registry.version("adapter-check", number + 10)
        await registry.delete_alias("adapter-check", "champion")
        assert mlflow.client("show", "adapter-check")["aliases"] == {}
    finally:
        await registry.close()
    away = MlflowRegistry(f"http://127.0.0.1:{free_port()}", 1000)
    try:
        with pytest.raises(RegistryUnavailable):
            await away.aliases("adapter-check")
    finally:
        await away.close()


async def test_champion_is_served(up: Up, mlflow: MlflowServer, session: aiohttp.ClientSession) -> None:
    """A first version with @champion is served through Envoy, with the features its tag declares."""
    assert (await burst(session, up, 1))[0].status == 404  # nothing resolved yet: not served
    mlflow.run_python(walkthrough("champion"))
    replies = await until_served(session, up, "v1")
    assert replies[0].body["registry_version"] == 1
    assert set(replies[0].body["features"]) == {"income", "debt_ratio"}
    assert [e["event"] for e in up.events() if e["event"] == "champion_served"] == ["champion_served"]


async def test_healthy_challenger_is_promoted(up: Up, mlflow: MlflowServer, session: aiohttp.ClientSession) -> None:
    """@challenger → canary at the first step within the poll delay, then every step, then @champion moved in MLflow."""
    setup = walkthrough("champion").split("client.create_registered_model")[0]
    mlflow.run_python(setup + walkthrough("challenger"))
    moved = time.monotonic()
    seen: collections.Counter[tuple[int, str | None]] = collections.Counter()
    reached = None
    deadline = time.monotonic() + RELEASE_S
    while time.monotonic() < deadline:
        replies = await burst(session, up)
        seen.update((r.status, r.headers.get("x-broker-version")) for r in replies)
        if reached is None and any(r.headers.get("x-broker-version") == "v2" for r in replies):
            reached = time.monotonic() - moved
            assert (
                "late_payments_12m"
                in next(r for r in replies if r.headers.get("x-broker-version") == "v2").body["features"]
            )
        if any(e["event"] == "release_promoted" for e in up.events()):
            break
    assert reached is not None and reached <= REACH_S, seen
    assert {status for status, _ in seen} == {200}, seen
    shown = mlflow.client("show", "credit-risk")
    assert shown["aliases"] == {"champion": 2}  # @challenger is dropped once it is the champion
    assert "model_broker.promoted" in shown["tags"][2]
    await until_served(session, up, "v2")
    release = [e for e in up.events() if e["source"] == "registry" and e["event"] != "champion_served"]
    assert [e["event"] for e in release] == ["release_started", "weights_changed", "release_promoted"]
    assert release[0]["percent"] == STEPS[0] and release[0]["version"] == "v2"
    steps = [e["percent"] for e in up.events() if e["event"] == "promotion"]
    assert steps == STEPS[1:]
    assert await metric(session, up, r'model_broker_releases_total\{model="credit-risk",outcome="promoted"\}') == 1
    assert await metric(session, up, r'model_broker_promotion_rate\{model="credit-risk"\}') == 1.0


async def test_failing_challenger_is_rolled_back(up: Up, mlflow: MlflowServer, session: aiohttp.ClientSession) -> None:
    """A challenger answering 500 is rolled back and tagged with why; the champion's clients saw no error."""
    assert mlflow.client("register", "credit-risk")["version"] == 3
    mlflow.client("alias", "credit-risk", "challenger", "3")
    seen: collections.Counter[tuple[int, str | None]] = collections.Counter()
    deadline = time.monotonic() + RELEASE_S
    while time.monotonic() < deadline:
        replies = await burst(session, up)
        seen.update((r.status, r.headers.get("x-broker-version")) for r in replies)
        if any(e["event"] == "release_rolled_back" for e in up.events()):
            break
    shown = mlflow.client("show", "credit-risk")
    why = json.loads(shown["tags"][3]["model_broker.rolled_back"])
    assert why["reason"] == "error_rate" and why["requests"] >= POLICY["min_requests"]
    assert shown["aliases"] == {"champion": 2, "challenger": 3}  # the alias is the team's; the tag says why
    assert seen[(500, "v3")] > 0, seen  # the canary did get traffic
    assert {k for k in seen if k[1] == "v2"} == {(200, "v2")}, seen
    await until_served(session, up, "v2")
    await asyncio.sleep(3)  # several polls: a rolled-back challenger is not canaried again
    assert all(r.headers.get("x-broker-version") == "v2" for r in await burst(session, up, 16))
    assert [e["event"] for e in up.events()][-1] == "release_rolled_back"
    assert await metric(session, up, r'model_broker_promotion_rate\{model="credit-risk"\}') == 0.5


def report(up: Up, *args: str) -> str:
    """`model-broker report credit-risk` on the stack's registry, as a person runs it."""
    cmd = [sys.executable, "-m", "extproc.cli", "report", "credit-risk", "--config", str(up.config), *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120).stdout


def test_report_tells_each_release(up: Up) -> None:
    """`model-broker report` (JSON and Markdown) gives both releases, their steps and endings, from the events."""
    releases = json.loads(report(up, "--format", "json"))["releases"]
    assert [(r["version"], r["outcome"], r["started_by"]) for r in releases] == [
        ("v2", "promoted", "model registry"),
        ("v3", "rolled_back", "model registry"),
    ]
    events = up.events()
    promoted, rolled_back = releases
    assert [(s["decision"], s["share_percent"]) for s in promoted["steps"]] == [("start", 20), ("promote", 100)]
    assert promoted["started_at"] == next(e["time"] for e in events if e["event"] == "release_started")
    step = promoted["steps"][1]
    promotion = next(e for e in events if e["event"] == "promotion")
    assert (step["requests"], step["errors"], step["p95_ms"]) == (
        promotion["requests"],
        promotion["errors"],
        promotion["p95_ms"],
    )
    assert rolled_back["reason"] == "error_rate" and rolled_back["steps"][-1]["decision"] == "roll back"
    assert rolled_back["steps"][-1]["error_rate"] > POLICY["max_error_rate"]
    markdown = report(up, "--since", "1h")
    assert "## v2 (registry version 2): promoted" in markdown
    assert "## v3 (registry version 3): rolled back" in markdown


def test_html_report_renders_in_a_real_browser(up: Up) -> None:
    """The HTML report (tables + matplotlib chart) loads in Debian's headless chromium; the screenshot is kept."""
    page = up.workdir / "report.html"
    page.write_text(report(up, "--format", "html"))
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "release-report.png"
    shot.unlink(missing_ok=True)
    browser = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--window-size=1200,1500",
    ]
    dom = subprocess.run(
        [*browser, "--dump-dom", page.as_uri()], check=True, capture_output=True, text=True, timeout=120
    )
    assert "<svg" in dom.stdout and "rolled back" in dom.stdout  # parsed: the chart and the tables are in the DOM
    subprocess.run([*browser, f"--screenshot={shot}", page.as_uri()], check=True, capture_output=True, timeout=TO)
    with Image.open(shot) as image:
        assert image.size == (1200, 1500)
        grey = image.convert("L")
        drawn = sum(grey.histogram()[:200])  # pixels darker than light grey: text, lines, table rules
    assert drawn > 0.01 * 1200 * 1500, "the screenshot is (nearly) blank"


async def test_registry_problems_change_nothing(up: Up, mlflow: MlflowServer, session: aiohttp.ClientSession) -> None:
    """Two aliases on one version, a version whose features tag is invalid: clear errors, v2 keeps serving."""
    mlflow.client("alias", "credit-risk", "challenger", "2")
    problem = await until_problem(session, up, "two_aliases")
    assert "both name version 2" in problem["message"]
    assert mlflow.client("register", "credit-risk", "bad feature!")["version"] == 4
    mlflow.client("alias", "credit-risk", "challenger", "4")
    problem = await until_problem(session, up, "invalid_features")
    assert "bad feature!" in problem["message"]
    assert mlflow.client("show", "credit-risk")["tags"][4]["model_broker.error"].startswith("invalid_features")
    assert all(r.headers.get("x-broker-version") == "v2" and r.status == 200 for r in await burst(session, up, 16))
    assert (
        await metric(session, up, r'model_broker_model_registry_errors_total\{code="two_aliases",model="credit-risk"\}')
        >= 1
    )


async def test_registry_unreachable_keeps_serving(up: Up, mlflow: MlflowServer, session: aiohttp.ClientSession) -> None:
    """MLflow stopped: traffic unchanged, the outage in the admin API and `model_broker_model_registry_up`."""
    mlflow.stop()
    problem = await until_problem(session, up, "registry_unreachable")
    assert problem["code"] == "registry_unreachable"
    assert await metric(session, up, r'model_broker_model_registry_up\{model="credit-risk"\}') == 0
    assert all(r.headers.get("x-broker-version") == "v2" and r.status == 200 for r in await burst(session, up, 16))


async def until_problem(session: aiohttp.ClientSession, up: Up, code: str) -> dict[str, Any]:
    deadline = time.monotonic() + REACH_S
    while time.monotonic() < deadline:
        status = (await admin_status(session, up))["model_registries"].get("credit-risk", {})
        if (status.get("problem") or {}).get("code") == code:
            return dict(status["problem"])
        await asyncio.sleep(0.3)
    raise AssertionError(f"no {code} problem reported: {status}")
