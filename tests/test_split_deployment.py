"""The Kubernetes shape on one machine: one control plane, two broker "pods" following it, two Envoys.

As the chart deploys it: `model-broker control-plane` runs alone; each broker pod
runs `serve --control-plane HOST:PORT` and each Envoy resolves the control plane
by DNS name (`envoy-config --control-plane-host`). Every process is real; the
"pods" differ by ports instead of IP addresses.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from extproc.process.launcher import envoy_binary, free_port, free_port_run, wait_listening, wait_ready
from extproc.rollout.discovery import RUNTIME_DIR_ENV, TOKEN_ENV
from tests.conftest import Proc, demo_registry_doc, logs_of
from tests.http import call

PATH = "/v1/models/credit-risk/predict"
TOKEN = "split-admin-token"
# Resolved by DNS, like a Service name: Envoy and gRPC clients take the STRICT_DNS path.
HOST = "localhost"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "extproc.cli", *args]


@dataclass
class Fleet:
    workdir: Path
    base_doc: dict[str, Any]
    pods: list[dict[str, Any]] = field(default_factory=list)
    procs: dict[str, Proc] = field(default_factory=dict)

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.base_doc['control_plane']['admin_port']}"

    @property
    def plane_target(self) -> str:
        return f"{HOST}:{self.base_doc['control_plane']['port']}"

    def envoy_base(self, pod: int) -> str:
        return f"http://127.0.0.1:{self.pods[pod]['listener']['port']}"

    def write(self, name: str, doc: dict[str, Any]) -> Path:
        directory = self.workdir / name
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "registry.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    def start_control_plane(self) -> None:
        config = self.write("control-plane", self.base_doc)
        self.procs["control-plane"] = Proc(
            "control-plane", cli("control-plane", "--config", str(config)), self.workdir / "control-plane.log"
        ).start()
        wait_ready(self.admin_url + "/healthz")

    def start_broker(self, pod: int) -> None:
        doc = self.pods[pod]
        config = self.workdir / f"pod-{pod}" / "registry.yaml"
        cmd = cli("serve", "--config", str(config), "--control-plane", self.plane_target)
        self.procs[f"broker-{pod}"] = Proc(f"broker-{pod}", cmd, self.workdir / f"broker-{pod}.log").start()
        for i in range(doc["broker"]["workers"]):
            wait_listening(doc["broker"]["port"] + i)

    def start_pod(self, pod: int) -> None:
        """A broker and an Envoy with ports of their own, sharing the models and the control plane."""
        doc = copy.deepcopy(self.base_doc)
        doc["listener"]["port"], doc["admin"]["port"], doc["egress"]["port"] = free_port(), free_port(), free_port()
        doc["metrics"]["port"] = free_port()
        doc["broker"]["port"] = free_port_run(doc["broker"]["workers"])
        doc["broker"]["http_port"] = free_port_run(doc["broker"]["workers"])
        self.pods.append(doc)
        config = self.write(f"pod-{pod}", doc)
        envoy_yaml = self.workdir / f"pod-{pod}" / "envoy.yaml"
        generate = ["envoy-config", "--config", str(config), "--broker-host", HOST, "--control-plane-host", HOST]
        subprocess.run(cli(*generate, "--output", str(envoy_yaml)), check=True, timeout=60)
        self.start_broker(pod)
        cmd = [envoy_binary(), "-c", str(envoy_yaml), "--log-level", "warn", "--disable-hot-restart"]
        self.procs[f"envoy-{pod}"] = Proc(
            f"envoy-{pod}", [*cmd, "--service-node", f"envoy-{pod}"], self.workdir / f"envoy-{pod}.log"
        ).start()
        wait_ready(self.envoy_base(pod) + "/healthz")

    def logs(self) -> str:
        return logs_of(self.procs.values())


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    runtime = tmp_path_factory.mktemp("runtime")
    workdir = tmp_path_factory.mktemp("split")
    fleet = Fleet(workdir, demo_registry_doc())
    with pytest.MonkeyPatch.context() as env:
        env.setenv(RUNTIME_DIR_ENV, str(runtime))
        env.setenv(TOKEN_ENV, TOKEN)
        try:
            models = fleet.write("models", fleet.base_doc)
            fleet.procs["models"] = Proc("models", cli("demo-models", "--config", str(models)), workdir / "models.log")
            fleet.procs["models"].start()
            fleet.start_control_plane()
            fleet.start_pod(0)
            fleet.start_pod(1)
            yield fleet
        except BaseException:
            print(fleet.logs())
            raise
        finally:
            for proc in reversed(list(fleet.procs.values())):
                proc.stop()


def weights(*args: str) -> subprocess.CompletedProcess[str]:
    """`model-broker weights ... --admin URL` as an operator runs it through a port-forward."""
    env = {**os.environ, TOKEN_ENV: TOKEN}
    return subprocess.run(cli("weights", *args), capture_output=True, text=True, timeout=60, check=False, env=env)


async def live_split(session: aiohttp.ClientSession, base: str) -> list[tuple[str, int]]:
    """credit-risk's weights as `GET /models` through one Envoy reports them, the same from every
    broker worker that answers (Envoy spreads the calls over them)."""
    splits = []
    for _ in range(8):
        models = await call(session, base + "/models", method="GET")
        model = next(m for m in models.body["models"] if m["name"] == "credit-risk")
        splits.append([(v["name"], v["weight"]) for v in model["versions"]])
    assert all(split == splits[0] for split in splits), splits
    return splits[0]


async def everyone_subscribed(fleet: Fleet) -> dict[str, Any]:
    """The control plane's view once both Envoys and every broker worker hold its current revision."""
    workers = sum(doc["broker"]["workers"] for doc in fleet.pods)
    for _ in range(100):
        shown: dict[str, Any] = json.loads(weights("show", "--admin", fleet.admin_url).stdout)
        acked = [s["acked_revision"] == shown["revision"] for s in shown["envoys"] + shown["brokers"]]
        if len(shown["envoys"]) == 2 and len(shown["brokers"]) == workers and all(acked):
            return shown
        await asyncio.sleep(0.1)
    raise AssertionError(f"not every Envoy and broker worker resubscribed: {shown}")


async def answered_by(session: aiohttp.ClientSession, base: str, count: int) -> collections.Counter[str]:
    async def one(i: int) -> str:
        reply = await call(session, base + PATH, {"customer_id": f"c-{i % 100 + 1}"})
        assert reply.status == 200, reply.raw
        return str(reply.headers["x-broker-version"])

    return collections.Counter(await asyncio.gather(*(one(i) for i in range(count))))


def set_split(fleet: Fleet, v1: int, v2: int) -> str:
    result = weights("set", "--admin", fleet.admin_url, "credit-risk", f"v1={v1}", f"v2={v2}")
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


async def test_one_change_reaches_every_envoy_and_every_broker(fleet: Fleet, session: aiohttp.ClientSession) -> None:
    """`weights set` returns once both Envoys and all four broker workers have the new split."""
    workers = sum(doc["broker"]["workers"] for doc in fleet.pods)
    out = set_split(fleet, 0, 100)
    assert f"applied on 2/2 Envoys and {workers}/{workers} broker workers" in out
    for pod in (0, 1):
        assert await live_split(session, fleet.envoy_base(pod)) == [("v1", 0), ("v2", 100)]
        assert await answered_by(session, fleet.envoy_base(pod), 40) == {"v2": 40}


async def test_a_restarted_broker_pod_starts_on_the_live_split(fleet: Fleet, session: aiohttp.ClientSession) -> None:
    """A broker pod replaced mid-rollout serves the live weights, not its registry's 80/20."""
    set_split(fleet, 30, 70)
    fleet.procs["broker-1"].stop()
    fleet.start_broker(1)
    assert await live_split(session, fleet.envoy_base(1)) == [("v1", 30), ("v2", 70)]


async def test_traffic_keeps_the_split_while_the_control_plane_is_away(
    fleet: Fleet, session: aiohttp.ClientSession
) -> None:
    """Killing the control plane changes nothing for clients; once back, changes flow again."""
    set_split(fleet, 0, 100)
    fleet.procs["control-plane"].kill()
    for pod in (0, 1):
        assert await answered_by(session, fleet.envoy_base(pod), 40) == {"v2": 40}
        assert await live_split(session, fleet.envoy_base(pod)) == [("v1", 0), ("v2", 100)]
    fleet.start_control_plane()
    shown = await everyone_subscribed(fleet)
    assert shown["models"]["credit-risk"] == {"v1": 0, "v2": 100}  # from the state file
    out = set_split(fleet, 100, 0)
    assert "applied on 2/2 Envoys" in out
    for pod in (0, 1):
        assert await answered_by(session, fleet.envoy_base(pod), 40) == {"v1": 40}


async def test_a_newer_declared_split_beats_an_older_live_change(fleet: Fleet, session: aiohttp.ClientSession) -> None:
    """GitOps: when the registry's declared split changes (an edited Model, a `helm upgrade`), the
    restarted control plane serves it instead of the live change made before."""
    set_split(fleet, 100, 0)
    fleet.procs["control-plane"].stop()
    doc = fleet.base_doc
    credit = next(m for m in doc["models"] if m["name"] == "credit-risk")
    credit["versions"][0]["weight"], credit["versions"][1]["weight"] = 50, 50
    fleet.start_control_plane()
    shown = await everyone_subscribed(fleet)
    assert shown["models"]["credit-risk"] == {"v1": 50, "v2": 50}
    for pod in (0, 1):
        assert await live_split(session, fleet.envoy_base(pod)) == [("v1", 50), ("v2", 50)]
    assert "credit-risk: the registry's declared split changed" in (fleet.workdir / "control-plane.log").read_text()
