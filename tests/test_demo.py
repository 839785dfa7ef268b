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

from extproc.process.launcher import free_port, wait_listening


def run_curl(line: str) -> tuple[str, Any]:
    """Run a printed curl line; its response head and JSON body."""
    cmd = [*shlex.split(line), "--max-time", "10"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=20)
    head, _, body = out.stdout.partition("\n\n")  # text mode folds CRLF
    return head, orjson.loads(body)


def audit_show(request_id: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    config = "model-broker-demo/registry.yaml"
    return subprocess.run(
        [sys.executable, "-m", "extproc.cli", "audit", "show", request_id, "--config", config],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=30,
        check=False,
    )


CREDIT_PATH = "/v1/models/credit-risk/predict"


def add_model(config: Path) -> str:
    """Add a `churn` model (fraud's demo backend at a new path) to the running demo's registry."""
    doc = yaml.safe_load(config.read_text())
    churn = {**next(m for m in doc["models"] if m["name"] == "fraud"), "name": "churn"}
    churn["path"] = "/v1/models/churn/predict"
    doc["models"].append(churn)
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(churn["path"])


def test_demo_prints_curl_lines_that_work_and_stops_cleanly(tmp_path: Path) -> None:
    """The printed curls get an enriched answer that `audit show` finds and an ensemble answer; a model added
    to the demo's registry answers without a restart; SIGTERM stops all."""
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
        deadline = time.monotonic() + 60
        while sum(line.strip().startswith("curl ") for line in lines) < 2:
            assert time.monotonic() < deadline and proc.poll() is None, lines
            lines.append(proc.stdout.readline())
        assert f"Model Broker is up at http://127.0.0.1:{port}" in "".join(lines)
        model_curl, ensemble_curl = (line.strip() for line in lines if line.strip().startswith("curl "))
        head, answer = run_curl(model_curl)
        assert head.startswith("HTTP/1.1 200")
        assert answer["model"] == "credit-risk" and answer["version"] in {"v1", "v2"}
        assert set(answer["features"]) >= {"income", "debt_ratio", "tenure_months"}
        assert "x-broker-version: " + answer["version"] in head.lower()
        request_id = next(h.split(":", 1)[1].strip() for h in head.splitlines() if h.lower().startswith("x-request-id"))
        deadline = time.monotonic() + 20
        while (shown := audit_show(request_id, tmp_path)).returncode != 0:  # shipped within about a second
            assert time.monotonic() < deadline, shown.stderr
            time.sleep(0.3)
        record = orjson.loads(shown.stdout)
        assert record["response"] == {"status": 200, "body": answer}
        assert record["version"] == answer["version"]
        head, answer = run_curl(ensemble_curl)
        assert head.startswith("HTTP/1.1 200"), answer
        assert set(answer["results"]) == {"credit-risk", "fraud"} and answer["errors"] == {}
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
