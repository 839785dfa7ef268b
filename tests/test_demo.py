"""`model-broker demo`: the README's first command, as a newcomer runs it."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson

from extproc.launcher import free_port, wait_listening


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


def test_demo_prints_a_curl_line_that_works_and_stops_cleanly(tmp_path: Path) -> None:
    """The printed curl gets an enriched answer that `audit show` finds; SIGTERM stops everything."""
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
        while not any(line.strip().startswith("curl ") for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, lines
            lines.append(proc.stdout.readline())
        assert f"Model Broker is up at http://127.0.0.1:{port}" in "".join(lines)
        curl = next(line.strip() for line in lines if line.strip().startswith("curl "))
        out = subprocess.run(
            [*shlex.split(curl), "--max-time", "10"], capture_output=True, text=True, check=True, timeout=20
        )
        head, _, body = out.stdout.partition("\n\n")  # text mode folds CRLF
        answer = orjson.loads(body)
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
