"""An edited registry file goes live without a restart: broker workers and the control plane reload it.

The stack is the real one (Envoy, broker, control plane, demo models); the
edits are what a user makes to registry.yaml, or what kubelet does to the
ConfigMap volume after the reconciler publishes.
"""

from __future__ import annotations

import asyncio
import copy
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import yaml

from extproc.rollout.client import request as admin_request
from extproc.rollout.discovery import RUNTIME_DIR_ENV, TOKEN_ENV, AdminEndpoint
from tests.conftest import Stack, demo_registry_doc, run_stack
from tests.http import call

TOKEN = "reload-test-token"
PATH = "/v1/models/credit-risk/predict"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv(RUNTIME_DIR_ENV, str(tmp_path_factory.mktemp("runtime")))
        env.setenv(TOKEN_ENV, TOKEN)
        with run_stack(demo_registry_doc(), tmp_path_factory.mktemp("reload")) as running:
            yield running


def edit(stack: Stack, change: Any) -> dict[str, Any]:
    """Rewrite registry.yaml with `change` applied to a copy of the running document."""
    doc = copy.deepcopy(stack.doc)
    change(doc)
    stack.config.write_text(yaml.safe_dump(doc, sort_keys=False))
    return doc


def model(doc: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(m for m in doc["models"] if m["name"] == name)
    return found


async def eventually(check: Any, timeout_s: float = 15.0) -> None:
    """Poll an async check until it holds; the reload period is one second per process."""
    for _ in range(int(timeout_s / 0.25)):
        if await check():
            return
        await asyncio.sleep(0.25)
    assert await check()


def pids(stack: Stack) -> dict[str, int]:
    return {name: proc.popen.pid for name, proc in stack.procs.items() if proc.popen is not None}


async def test_features_and_version_change_without_a_restart(stack: Stack, session: aiohttp.ClientSession) -> None:
    """A model's feature list and the registry version change under traffic; no process restarts."""
    before = pids(stack)

    def more_features(doc: dict[str, Any]) -> None:
        doc["registry_version"] = "demo-2"
        model(doc, "credit-risk")["features"].append("segment")

    stack.doc = edit(stack, more_features)

    async def enriched() -> bool:
        reply = await call(session, stack.base + PATH, {"customer_id": "c-1"})
        assert reply.status == 200, reply.raw
        return bool(reply.body["features"].get("segment") == "retail")

    async def every_worker_enriches() -> bool:  # each worker reloads on its own second: ask them all
        return all([await enriched() for _ in range(8)])

    await eventually(every_worker_enriches)
    for _ in range(20):
        assert await enriched()
    health = await call(session, stack.base + "/healthz", method="GET")
    assert health.body["registry_version"] == "demo-2"
    assert pids(stack) == before


async def test_a_new_model_reaches_the_control_plane_and_models_list(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    """A model added to the file is listed by `GET /models` and gets live weights from the control plane."""

    def add_churn(doc: dict[str, Any]) -> None:
        churn = copy.deepcopy(model(doc, "fraud"))
        churn.update(name="churn", path="/v1/models/churn/predict")
        doc["models"].append(churn)

    stack.doc = edit(stack, add_churn)

    async def listed() -> bool:
        models = await call(session, stack.base + "/models", method="GET")
        return "churn" in {m["name"] for m in models.body["models"]}

    await eventually(listed)
    admin = AdminEndpoint(f"http://127.0.0.1:{stack.doc['control_plane']['admin_port']}", TOKEN, 0, "")

    async def weighted() -> bool:
        status, doc = await asyncio.to_thread(admin_request, admin, "GET", "/weights")
        return status == 200 and "churn" in doc["models"]

    await eventually(weighted)


@pytest.mark.parametrize(
    ("case", "change", "logged"),
    [
        ("restart-only", lambda d: d["broker"].update(message_timeout_ms=900), "broker changed; restart to apply"),
        ("invalid", lambda d: model(d, "credit-risk").update(entity="merchant"), "is invalid"),
    ],
)
async def test_an_edit_that_cannot_apply_live_is_refused_and_logged(
    stack: Stack, session: aiohttp.ClientSession, case: str, change: Any, logged: str
) -> None:
    """The old registry keeps serving; both the broker and its control plane say why in the log."""
    log = stack.procs["broker"].log
    seen = log.read_text().count(logged)
    served = (await call(session, stack.base + PATH, {"customer_id": "c-2"})).body["features"]
    edit(stack, change)

    async def refused() -> bool:
        return log.read_text().count(logged) >= seen + 2  # every worker and the control plane, at least two

    await eventually(refused)
    reply = await call(session, stack.base + PATH, {"customer_id": "c-2"})
    assert reply.status == 200 and reply.body["features"] == served, reply.raw
    stack.config.write_text(yaml.safe_dump(stack.doc, sort_keys=False))  # back to what is served


async def test_weight_edits_are_recorded_as_release_events(stack: Stack) -> None:
    """Editing a model's weights in the file is a rollout event by `edit`; the report names the edit as the start."""
    events = stack.workdir / "rollout-state.events.jsonl"

    def edited() -> list[dict[str, Any]]:
        lines = events.read_text().splitlines() if events.exists() else []
        return [e for e in map(json.loads, lines) if e["source"] == "edit" and e["model"] == "credit-risk"]

    def weights(v1: int, v2: int) -> Any:
        def change(doc: dict[str, Any]) -> None:
            model(doc, "credit-risk")["versions"][0]["weight"] = v1
            model(doc, "credit-risk")["versions"][1]["weight"] = v2

        return change

    stack.doc = edit(stack, weights(100, 0))

    async def recorded(count: int) -> bool:
        return len(edited()) >= count

    await eventually(lambda: recorded(1))
    stack.doc = edit(stack, weights(70, 30))
    await eventually(lambda: recorded(2))
    first, second = edited()[:2]
    assert (first["before"], first["after"]) == ({"v1": 80, "v2": 20}, {"v1": 100, "v2": 0})
    assert second["after"] == second["live"] == {"v1": 70, "v2": 30}
    cmd = [sys.executable, "-m", "extproc.cli", "report", "credit-risk", "--config", str(stack.config)]
    run = await asyncio.to_thread(
        subprocess.run, [*cmd, "--format", "json"], check=True, capture_output=True, text=True, timeout=120
    )
    (release,) = [r for r in json.loads(run.stdout)["releases"] if r["started_at"] == second["time"]]
    assert (release["version"], release["started_by"]) == ("v2", "registry file edit")
    assert release["outcome"] == "in_progress"
