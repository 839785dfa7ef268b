"""`model-broker demo`: the README's first command, as a newcomer runs it."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import yaml

from extproc.process.banner import REQUEST_ID
from extproc.process.launcher import free_port, wait_listening
from extproc.rollout.discovery import runtime_dir
from tests.quickstart import fresh_shell_env, printed_commands


def run_curl(line: str) -> tuple[str, Any]:
    """Run a printed curl line; its response head and JSON body."""
    cmd = [*shlex.split(line), "--max-time", "10"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=20)
    head, _, body = out.stdout.partition("\n\n")  # text mode folds CRLF
    return head, orjson.loads(body)


def run_printed(line: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """A printed command line, in bash, as the user pastes it into a new terminal."""
    env = fresh_shell_env(runtime_dir(), None)
    return subprocess.run(
        ["bash", "-c", line], capture_output=True, text=True, cwd=cwd, env=env, timeout=60, check=False
    )


def run_printed_cli(commands: list[str], request_id: str, cwd: Path) -> Any:
    """Run the printed CLI lines (weights show, weights set, audit list, audit show); the record shown."""
    cli = [line.replace(REQUEST_ID, request_id) for line in commands if not line.startswith("curl ")]
    assert not any(line.startswith("model-broker ") for line in cli), "the venv is not on this shell's PATH"
    assert len(cli) == 4 and " audit show " in cli[-1], cli
    deadline = time.monotonic() + 20
    for line in cli:
        while (done := run_printed(line, cwd)).returncode != 0:  # a record ships about a second later
            assert time.monotonic() < deadline and " audit show " in line, (line, done.stderr)
            time.sleep(0.3)
    return orjson.loads(done.stdout)


CREDIT_PATH = "/v1/models/credit-risk/predict"


def add_model(config: Path) -> str:
    """Add a `churn` model (fraud's demo backend at a new path) to the running demo's registry."""
    doc = yaml.safe_load(config.read_text())
    churn = {**next(m for m in doc["models"] if m["name"] == "fraud"), "name": "churn"}
    churn["path"] = "/v1/models/churn/predict"
    doc["models"].append(churn)
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(churn["path"])


def test_every_command_the_demo_prints_works_as_printed(tmp_path: Path) -> None:
    """Each printed curl answers 200 (credit-risk enriched); each printed CLI line runs in a shell without the
    venv on PATH (weights set, audit list/show finding the answer's record); a model added to the demo's
    registry answers without a restart; SIGTERM stops all."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc.cli", "demo", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
        cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 120  # a loaded 2-core box; usually about 5 s
        while not lines or not lines[-1].startswith("Edit "):
            assert time.monotonic() < deadline and proc.poll() is None, lines
            lines.append(proc.stdout.readline())
        assert f"Model Broker is up at http://127.0.0.1:{port}" in lines[0]
        commands = printed_commands(lines)
        curls = [line for line in commands if line.startswith("curl ")]
        assert len(curls) == 3, lines  # credit-risk, fraud, the ensemble
        answers = [run_curl(line) for line in curls]
        assert [head.split("\n", 1)[0] for head, _ in answers] == ["HTTP/1.1 200 OK"] * 3, answers
        (head, answer), _, (_, ensemble) = answers
        model_curl = curls[0]
        assert answer["model"] == "credit-risk" and answer["version"] in {"v1", "v2"}
        assert set(answer["features"]) >= {"income", "debt_ratio", "tenure_months"}
        assert "x-broker-version: " + answer["version"] in head.lower()
        assert set(ensemble["results"]) == {"credit-risk", "fraud"} and ensemble["errors"] == {}
        request_id = next(h.split(":", 1)[1].strip() for h in head.splitlines() if h.lower().startswith("x-request-id"))
        record = run_printed_cli(commands, request_id, tmp_path)
        assert record["response"] == {"status": 200, "body": answer}
        assert record["version"] == answer["version"]
        churn = add_model(tmp_path / "model-broker-demo" / "registry.yaml")
        deadline = time.monotonic() + 20
        while not (head := run_curl(model_curl.replace(CREDIT_PATH, churn))[0]).startswith("HTTP/1.1 200"):
            assert time.monotonic() < deadline and proc.poll() is None, head  # Envoy, broker follow the file
            time.sleep(0.3)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert code == 0
    try:
        wait_listening(port, timeout_s=0.5)
    except RuntimeError:
        pass
    else:
        raise AssertionError("the demo left something listening after SIGTERM")
