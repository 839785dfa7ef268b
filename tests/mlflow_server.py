"""A real MLflow tracking server on loopback (sqlite backend), from its own virtualenv, and its client."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest

from extproc.process.launcher import free_port, wait_ready
from tests.conftest import ROOT, Proc

# MLflow's server imports a lot at start (FastAPI, SQLAlchemy migrations): slow on a busy box.
START_TIMEOUT_S = 180
# One client command imports mlflow (seconds on a quiet box, a minute or more on a loaded one).
CLIENT_TIMEOUT_S = 300
# No telemetry from the server or the client: the tests run without any network but loopback.
# The tracking URI the README's walkthrough names; the tests swap in the fixture's.
README_TRACKING_URI = "http://127.0.0.1:5000"
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


def mlflow_venv() -> Path:
    """Built once per requirements change by the project's script, then reused."""
    out = subprocess.run([str(ROOT / "scripts" / "mlflow-venv")], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


class MlflowServer:
    def __init__(self, workdir: Path) -> None:
        self.venv = mlflow_venv()
        self.port = free_port()
        self.workdir = workdir
        self.proc = Proc(
            "mlflow",
            [
                str(self.venv / "bin" / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{workdir / 'mlflow.db'}",
                "--default-artifact-root",
                str(workdir / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            workdir / "mlflow.log",
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MlflowServer:
        with pytest.MonkeyPatch.context() as env:
            for name, value in QUIET.items():
                env.setenv(name, value)
            self.proc.start()
        wait_ready(self.url + "/health", timeout_s=START_TIMEOUT_S)
        return self

    def stop(self) -> None:
        self.proc.stop()

    def run_python(self, code: str) -> None:
        """Python code using MLflow's client (the README's walkthrough), with this server's URL."""
        subprocess.run(
            [str(self.venv / "bin" / "python"), "-I", "-c", code.replace(README_TRACKING_URI, self.url)],
            check=True,
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT_S,
            env={**os.environ, **QUIET},
        )

    def client(self, *args: str) -> Any:
        """One command of tests/mlflow_client.py: MLflow's own client, from its virtualenv."""
        out = subprocess.run(
            [str(self.venv / "bin" / "python"), "-I", str(ROOT / "tests" / "mlflow_client.py"), self.url, *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT_S,
            env={**os.environ, **QUIET},
        )
        doc = json.loads(out.stdout.strip().splitlines()[-1])
        if "tags" in doc:  # JSON object keys are strings; version numbers are ints everywhere else
            doc["tags"] = {int(number): tags for number, tags in doc["tags"].items()}
        return doc


def walkthrough(name: str) -> str:
    """One code block of the README's "Promote from MLflow" walkthrough, by its marker: the tests run what it says."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(rf"<!-- walkthrough:{name} -->\n```\w+\n(.*?)```", text, re.S)
    assert found, f"README has no walkthrough:{name} block"
    return found.group(1)


class Stack(Protocol):
    doc: dict[str, Any]  # the registry the stack runs


async def metric(session: aiohttp.ClientSession, up: Stack, pattern: str) -> float:
    """One sample of the broker's Prometheus endpoint (0 when absent), `pattern` a regex of its name and labels."""
    async with session.get(f"http://127.0.0.1:{up.doc['metrics']['port']}/metrics") as resp:
        text = await resp.text()
    found = re.search("^" + pattern + r" (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0
