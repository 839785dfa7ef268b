"""Ground truth through `model-broker up` (real Envoy, broker, control plane) and a real MLflow registry.

Clients post truths to `POST /v1/feedback` through Envoy (API key, as for model calls); the
control plane joins them to the audit records: accuracy per version and per shadow in
`GET /models` and the metrics, kept across a restart. The accuracy gate rolls back a
challenger whose answers are wrong (tagged in MLflow, no error for the champion's clients)
and promotes one shown no worse than the champion.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
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

from extproc.process.launcher import free_port, wait_ready
from extproc.rollout.discovery import TOKEN_ENV
from extproc.rollout.feedback_desk import labels_path
from tests.conftest import ClientOptions, Proc, demo_registry_doc, logs_of
from tests.http import Reply, call
from tests.mlflow_server import README_TRACKING_URI, MlflowServer, metric, walkthrough

PATH = "/v1/models/credit-risk/predict"
CHURN = "/v1/models/churn/predict"
PLAIN = "/v1/models/plain/predict"
TOKEN = "feedback-test-token"
KEY, OTHER_KEY = "scorer-key-1", "other-key-1"
# Registry version N answers on 127.0.0.N; these answer every label wrong.
WRONG = {2}
GATE = {"min_labelled": 20, "margin": 0.1, "confidence": 0.95}
POLICY = {
    "window_seconds": 10,
    "min_requests": 10,
    "max_error_rate": 0.2,
    "promote_steps": [20, 100],
    "promote_after_seconds": 2,
    "accuracy": GATE,
}
REACH_S, RELEASE_S = 60, 180
REGISTRY_TIMEOUT_MS = 30_000


def truth_of(customer: str) -> str:
    return "approve" if int(customer.rsplit("-", 1)[1]) % 2 == 0 else "decline"


def sha(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="module")
async def model_port() -> AsyncIterator[int]:
    """Version N answers on 127.0.0.N with a label: the customer's truth, or its opposite for WRONG versions."""

    async def predict(request: web.Request) -> web.Response:
        number = int(request.transport.get_extra_info("sockname")[0].rsplit(".", 1)[1])  # type: ignore[union-attr]
        body = await request.json()
        label = truth_of(body["customer_id"])
        if number in WRONG:
            label = {"approve": "decline", "decline": "approve"}[label]
        return web.json_response({"label": label, "registry_version": number})

    app = web.Application()
    app.router.add_post("/predict", predict)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    for number in range(1, 5):
        await web.TCPSite(runner, f"127.0.0.{number}", port).start()
    yield port
    await runner.cleanup()


def static_model(name: str, port: int, **extra: Any) -> dict[str, Any]:
    """A model with fixed versions: `a` on 127.0.0.1 (right), `b` on 127.0.0.2 (wrong), `a` takes all traffic."""
    versions = [
        {"name": "a", "weight": 100, "backend": {"service": {"host": "127.0.0.1", "port": port, "path": "/predict"}}},
        {"name": "b", "weight": 0, "backend": {"service": {"host": "127.0.0.2", "port": port, "path": "/predict"}}},
    ]
    return {"name": name, "path": f"/v1/models/{name}/predict", "entity": "customer", "versions": versions, **extra}


def registry_doc(mlflow_url: str, port: int) -> dict[str, Any]:
    """The README's model (with its feedback declaration) on this MLflow, a shadowed model and an unaudited one."""
    (model,) = yaml.safe_load(walkthrough("registry"))["models"]
    assert model["registry"]["mlflow"]["tracking_uri"] == README_TRACKING_URI
    assert model["feedback"] == {"kind": "classification", "answer_field": "label"}
    assert set(model["rollout"]["accuracy"]) == set(GATE)  # the README's gate, made quick for a test below
    model["registry"]["mlflow"].update(tracking_uri=mlflow_url, timeout_ms=REGISTRY_TIMEOUT_MS)
    model["backend_template"]["service"].update(host="127.0.0.{version}", port=port)
    model["rollout"] = POLICY
    doc = demo_registry_doc()
    doc["broker"]["workers"] = 1
    doc["ensembles"] = []
    churn = static_model(
        "churn",
        port,
        feedback={"kind": "classification", "answer_field": "label"},
        shadow={"version": "b", "compare_field": "label"},
    )
    doc["admin"]["public_endpoints"] = True  # GET /models through the public listener
    doc["models"] = [model, churn, static_model("plain", port, audit=False)]
    doc["consumers"] = [
        {"name": "scorer", "api_keys": [sha(KEY)], "models": ["credit-risk", "churn", "plain"], "admin": True},
        {"name": "other", "api_keys": [sha(OTHER_KEY)], "models": ["plain"]},
    ]
    return doc


class Up:
    def __init__(self, doc: dict[str, Any], workdir: Path) -> None:
        self.doc, self.workdir = doc, workdir
        self.config = workdir / "registry.yaml"
        self.config.write_text(yaml.safe_dump(doc, sort_keys=False))
        self.proc = self._proc()

    def _proc(self) -> Proc:
        cmd = [sys.executable, "-m", "extproc.cli", "up", "--config", str(self.config), "--workers", "1"]
        return Proc("up", cmd, self.workdir / "up.log")

    def start(self) -> None:
        with pytest.MonkeyPatch.context() as env:
            env.setenv(TOKEN_ENV, TOKEN)
            self.proc.start()
        wait_ready(self.base + "/healthz", timeout_s=120)

    def restart(self) -> None:
        self.proc.stop()
        self.proc = self._proc()
        self.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.doc['listener']['port']}"

    def events(self) -> list[dict[str, Any]]:
        path = self.workdir / "rollout-state.events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def up(mlflow: MlflowServer, model_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    stack = Up(registry_doc(mlflow.url, model_port), tmp_path_factory.mktemp("up"))
    try:
        stack.start()
        yield stack
    except BaseException:
        print(logs_of([stack.proc, mlflow.proc]))
        raise
    finally:
        stack.proc.stop()


@pytest.fixture
def client_options() -> ClientOptions:
    # 30 s, the budget this module always had: the whole `model-broker up` stack, control plane and MLflow.
    return ClientOptions(timeout_s=30)


HEADERS = {"content-type": "application/json", "x-api-key": KEY}


async def burst(session: aiohttp.ClientSession, up: Up, path: str = PATH, n: int = 16) -> list[tuple[str, Reply]]:
    customers = [f"c-{k + 1}" for k in range(n)]
    replies = await asyncio.gather(
        *(call(session, up.base + path, {"customer_id": c}, headers=HEADERS) for c in customers)
    )
    return list(zip(customers, replies, strict=True))


async def feedback(session: aiohttp.ClientSession, up: Up, body: Any, key: str | None = KEY) -> Reply:
    headers = {"content-type": "application/json", **({"x-api-key": key} if key else {})}
    return await call(session, up.base + "/v1/feedback", body, headers=headers)


def truths(sent: list[tuple[str, Reply]]) -> list[dict[str, Any]]:
    return [{"request_id": r.headers["x-request-id"], "truth": truth_of(c)} for c, r in sent if r.status == 200]


async def models_doc(session: aiohttp.ClientSession, up: Up, model: str) -> dict[str, Any]:
    reply = await call(session, up.base + "/models", method="GET", headers={"x-api-key": KEY})
    assert reply.status == 200, reply.body
    return dict(next(m for m in reply.body["models"] if m["name"] == model)["ground_truth"])


async def until_served(session: aiohttp.ClientSession, up: Up, version: str) -> None:
    deadline = time.monotonic() + REACH_S
    while time.monotonic() < deadline:
        sent = await burst(session, up)
        if all(r.status == 200 and r.headers.get("x-broker-version") == version for _, r in sent):
            return
        await asyncio.sleep(0.3)
    raise AssertionError(
        f"{version} never served alone: {[(r.status, r.headers.get('x-broker-version')) for _, r in sent]}"
    )


async def test_truth_is_joined_per_version(up: Up, mlflow: MlflowServer, session: aiohttp.ClientSession) -> None:
    """A batch of truths through Envoy: each joined to its audit record; v1's accuracy in /models and metrics."""
    mlflow.run_python(walkthrough("champion"))
    await until_served(session, up, "v1")
    sent = await burst(session, up)
    items = truths(sent)
    (example,) = json.loads(walkthrough("feedback"))  # the README's shape is what is posted
    assert all(set(item) == set(example) for item in items)
    posted = await feedback(session, up, items)
    assert posted.status == 200, posted.body
    assert posted.body["labelled"] == 16
    assert {(r["status"], r["version"], r["correct"]) for r in posted.body["results"]} == {(200, "v1", True)}
    truth = await models_doc(session, up, "credit-risk")
    assert truth["kind"] == "classification" and truth["versions"]["v1"]["labelled"] >= 16
    assert truth["versions"]["v1"]["accuracy"] == 1.0
    pattern = r'model_broker_feedback_accuracy\{model="credit-risk",role="served",version="v1"\}'
    assert await metric(session, up, pattern) == 1.0


async def test_feedback_refusals_and_idempotence(up: Up, session: aiohttp.ClientSession) -> None:
    """Same truth again: 200, not counted twice; another truth: 409; unknown id: 404; unaudited model: 409; auth."""
    ((customer, reply),) = await burst(session, up, n=1)
    item = {"request_id": reply.headers["x-request-id"], "truth": truth_of(customer)}
    first = await feedback(session, up, item)
    assert first.status == 200 and first.body["duplicate"] is False, first.body
    before = (await models_doc(session, up, "credit-risk"))["versions"]["v1"]["labelled"]
    again = await feedback(session, up, item)
    assert again.status == 200 and again.body["duplicate"] is True
    assert (await models_doc(session, up, "credit-risk"))["versions"]["v1"]["labelled"] == before
    changed = await feedback(session, up, {**item, "truth": "maybe"})
    assert changed.status == 409 and changed.error_code() == "feedback_conflict"
    unknown = await feedback(session, up, {"request_id": "no-such-request", "truth": "approve"})
    assert unknown.status == 404 and unknown.error_code() == "unknown_request"
    ((_, plain),) = await burst(session, up, PLAIN, n=1)
    assert plain.status == 200
    unaudited = await feedback(
        session, up, {"request_id": plain.headers["x-request-id"], "truth": "x", "model": "plain"}
    )
    assert unaudited.status == 409 and unaudited.error_code() == "not_audited"
    bad = await feedback(session, up, {"request_id": item["request_id"]})
    assert bad.status == 400 and bad.error_code() == "invalid_feedback"
    assert (await feedback(session, up, item, key=None)).status == 401
    assert (await feedback(session, up, item, key=OTHER_KEY)).status == 403
    wrong_method = await call(session, up.base + "/v1/feedback", method="GET", headers={"x-api-key": KEY})
    assert wrong_method.status == 405


async def test_shadow_agreement_with_truth(up: Up, session: aiohttp.ClientSession) -> None:
    """On a shadowed model the truth scores the served answer and the shadow's: agreement per shadow version."""
    sent = await burst(session, up, CHURN)
    assert {r.headers.get("x-broker-version") for _, r in sent} == {"a"}
    await asyncio.sleep(3)  # the shadow's answers reach the control plane beside the primary's
    posted = await feedback(session, up, truths(sent))
    assert posted.status == 200, posted.body
    truth = await models_doc(session, up, "churn")
    assert truth["versions"]["a"] == {"labelled": 16, "accuracy": 1.0}
    assert truth["shadows"]["b"]["labelled"] >= 12 and truth["shadows"]["b"]["accuracy"] == 0.0
    pattern = r'model_broker_feedback_accuracy\{model="churn",role="shadow",version="b"\}'
    assert await metric(session, up, pattern) == 0.0


async def release(
    up: Up, mlflow: MlflowServer, session: aiohttp.ClientSession, number: int, ending: str
) -> collections.Counter[tuple[int, str | None]]:
    """@challenger → number; traffic with truths posted for every answer until the release ends."""
    mlflow.client("alias", "credit-risk", "challenger", str(number))
    seen: collections.Counter[tuple[int, str | None]] = collections.Counter()
    deadline = time.monotonic() + RELEASE_S
    while time.monotonic() < deadline:
        sent = await burst(session, up)
        seen.update((r.status, r.headers.get("x-broker-version")) for _, r in sent)
        assert (await feedback(session, up, truths(sent))).status == 200
        if any(e["event"] == ending and e.get("version") == f"v{number}" for e in up.events()):
            return seen
    raise AssertionError(f"no {ending} for v{number}: {seen}, {up.events()[-3:]}")


async def test_inaccurate_challenger_is_rolled_back(
    up: Up, mlflow: MlflowServer, session: aiohttp.ClientSession
) -> None:
    """v2 answers every label wrong: no 5xx, yet fed-back truth rolls it back, tagged with why in MLflow."""
    assert mlflow.client("register", "credit-risk")["version"] == 2
    seen = await release(up, mlflow, session, 2, "release_rolled_back")
    assert seen[(200, "v2")] > 0, seen  # the canary did get traffic
    assert {status for status, _ in seen} == {200}, seen  # nobody saw an error, champion's clients included
    why = json.loads(mlflow.client("show", "credit-risk")["tags"][2]["model_broker.rolled_back"])
    assert why["reason"] == "accuracy" and why["test"] == "newcombe_hybrid_score"
    assert why["canary_labelled"] >= GATE["min_labelled"] and why["canary_accuracy"] < why["champion_accuracy"]
    assert not any(e["event"] == "promotion" for e in up.events())  # held at its first step until judged
    await until_served(session, up, "v1")


async def test_accurate_challenger_is_promoted(up: Up, mlflow: MlflowServer, session: aiohttp.ClientSession) -> None:
    """v3 answers right: held until the gate shows it no worse than v1, then promoted and @champion moved."""
    assert mlflow.client("register", "credit-risk")["version"] == 3
    await release(up, mlflow, session, 3, "release_promoted")
    promotion = next(e for e in up.events() if e["event"] == "promotion")
    judged = promotion["accuracy"]
    assert judged["reason"] == "accuracy_not_worse" and judged["canary_labelled"] >= GATE["min_labelled"]
    assert judged["difference_low"] > -GATE["margin"]
    assert mlflow.client("show", "credit-risk")["aliases"] == {"champion": 3}


async def test_labels_survive_a_restart(up: Up, session: aiohttp.ClientSession) -> None:
    """The labels are persisted: after `up` restarts, /models and the metrics show the same tallies."""
    before = await models_doc(session, up, "credit-risk")
    lines = labels_path(str(up.workdir / "rollout-state.json")).read_text().splitlines()
    assert sum(v["labelled"] for v in before["versions"].values()) == sum(
        1 for line in lines if json.loads(line)["model"] == "credit-risk"
    )
    up.restart()
    assert await models_doc(session, up, "credit-risk") == before
    pattern = r'model_broker_feedback_labelled\{model="credit-risk",role="served",version="v1"\}'
    assert await metric(session, up, pattern) == before["versions"]["v1"]["labelled"]


def test_report_shows_accuracy(up: Up) -> None:
    """`model-broker report` gives each release's accuracy from the persisted labels, and the shadow's agreement."""
    cmd = [sys.executable, "-m", "extproc.cli", "report", "credit-risk", "--config", str(up.config), "--format", "json"]
    releases = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120).stdout)[
        "releases"
    ]
    by_version = {r["version"]: r for r in releases}
    assert by_version["v2"]["outcome"] == "rolled_back" and by_version["v2"]["reason"] == "accuracy"
    assert by_version["v2"]["accuracy"]["canary"]["accuracy"] == 0.0
    assert by_version["v3"]["accuracy"]["canary"]["accuracy"] == 1.0
    assert by_version["v3"]["accuracy"]["champion"]["version"] == "v1"
    cmd[4] = "churn"
    churn = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120).stdout)
    assert churn["ground_truth"]["shadows"]["b"]["accuracy"] == 0.0
