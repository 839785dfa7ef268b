"""The README's quick start as a newcomer runs it: a fresh copy, a fresh shell, every printed command as printed.

One `make demo` (fresh venv from the kept wheel directory, port 8080 in a private
network namespace) serves the whole module; it costs about 20 s on the 2-core box.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from extproc.process.banner import REQUEST_ID
from tests import quickstart
from tests.quickstart import Netns

# Installing into a fresh venv and starting the stack; generous for a loaded 2-core box.
DEMO_START_DEADLINE_S = 300.0


@dataclass
class Newcomer:
    """The newcomer's second terminal: their copy of the repository, their shell, the demo's output so far."""

    netns: Netns
    clone: Path
    env: dict[str, str]
    demo_log: Path

    def run(self, line: str) -> subprocess.CompletedProcess[str]:
        return self.netns.run(line, self.clone, self.env)

    def banner(self) -> list[str]:
        return self.demo_log.read_text(encoding="utf-8", errors="replace").splitlines()


def _wait_for_banner(demo: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + DEMO_START_DEADLINE_S
    while "Model Broker is up at" not in log.read_text(encoding="utf-8", errors="replace"):
        assert demo.poll() is None, f"`make demo` exited with {demo.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no banner after {DEMO_START_DEADLINE_S:.0f}s:\n{log.read_text()}"
        time.sleep(0.5)
    # The banner is printed in one write; give the pipe a moment to hold all of it.
    deadline = time.monotonic() + 10
    while not any(line.startswith("Edit ") for line in log.read_text().splitlines()):
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Newcomer]:
    wheels = quickstart.wheel_dir()
    home = tmp_path_factory.mktemp("newcomer")
    clone = quickstart.copy_checkout(home / "model-broker")
    env = quickstart.fresh_shell_env(home / "runtime", wheels)
    first = quickstart.quick_start_blocks(quickstart.README.read_text(encoding="utf-8"))[0]
    assert quickstart.commands(first[1]) == ["make demo"], "the quick start begins with `make demo` alone"
    log = home / "make-demo.log"
    with quickstart.network_namespace() as netns:
        demo = netns.popen("make demo", clone, env, log)
        try:
            _wait_for_banner(demo, log)
            yield Newcomer(netns, clone, env, log)
        finally:
            quickstart.stop_group(demo)


def _status(curl_output: str) -> str:
    return curl_output.replace("\r\n", "\n").split("\n", 1)[0]


def _request_id(curl_output: str) -> str:
    for line in curl_output.replace("\r\n", "\n").splitlines():
        if line.lower().startswith("x-request-id:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no x-request-id in {curl_output!r}")


def test_the_quick_start_runs_as_written(newcomer: Newcomer) -> None:
    """After `make demo`, each quick-start command exits 0 in a fresh shell at the clone's root; curl answers 200."""
    lines = quickstart.quick_start_lines(quickstart.README.read_text(encoding="utf-8"))
    assert any(line.startswith("curl ") for line in lines) and any("weights set" in line for line in lines)
    for line in lines:
        done = newcomer.run(line)
        assert done.returncode == 0, (line, done.stdout, done.stderr)
        if line.startswith("curl ") and " -i " in line:
            assert _status(done.stdout) == "HTTP/1.1 200 OK", (line, done.stdout)


def test_every_command_the_demo_printed_runs_as_printed(newcomer: Newcomer) -> None:
    """The banner's curls answer 200 and its CLI lines run in the fresh shell (no venv on PATH), from any directory."""
    printed = quickstart.printed_commands(newcomer.banner())
    curls = [line for line in printed if line.startswith("curl ")]
    assert len(curls) == 3, printed  # credit-risk, fraud, the underwriting ensemble
    answers = [newcomer.run(line) for line in curls]
    assert all(_status(a.stdout) == "HTTP/1.1 200 OK" for a in answers), [a.stdout for a in answers]
    request_id = _request_id(answers[0].stdout)
    cli = [line.replace(REQUEST_ID, request_id) for line in printed if not line.startswith("curl ")]
    assert cli and all(line.split()[0].startswith("/") for line in cli), cli  # `model-broker` is not on this PATH
    elsewhere = newcomer.clone.parent
    deadline = time.monotonic() + 30
    for line in cli:
        while (done := newcomer.netns.run(line, elsewhere, newcomer.env)).returncode != 0:
            assert " audit show " in line and time.monotonic() < deadline, (line, done.stderr)
            time.sleep(0.5)  # a record is shipped about a second after its answer


def json_shape(value: Any) -> Any:
    """The keys and value kinds of a JSON document, not its values."""
    if isinstance(value, dict):
        return {key: json_shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_shape(value[0])] if value else []
    if isinstance(value, bool) or value is None:
        return type(value).__name__
    return "number" if isinstance(value, int | float) else "string"


def response_shape(output: str) -> tuple[str, set[str], Any]:
    """(status line, header names, body shape) of a curl -i output, or ("", {}, shape) of a JSON output."""
    text = output.replace("\r\n", "\n").strip()
    if not text.startswith("HTTP/"):
        return "", set(), json_shape(json.loads(text))
    head, _, body = text.partition("\n\n")
    status, *headers = head.splitlines()
    return status, {h.split(":", 1)[0].lower() for h in headers}, json_shape(json.loads(body))


def test_readme_samples_have_the_shape_of_what_the_demo_answers(newcomer: Newcomer) -> None:
    """Each README sample marked as demo output: its command, run now, answers the same status, at least the
    same headers, and a body with the same keys and kinds of values."""
    readme = quickstart.README.read_text(encoding="utf-8")
    samples = quickstart.demo_output_samples(readme)
    assert len(samples) >= 3, samples  # a model, the ensemble, an audit record
    first_curl = next(line for line in quickstart.quick_start_lines(readme) if line.startswith("curl "))
    request_id = _request_id(newcomer.run(first_curl).stdout)
    deadline = time.monotonic() + 30
    for command, printed in samples:
        line = command.replace(REQUEST_ID, request_id)
        while (done := newcomer.run(line)).returncode != 0:
            assert " audit show " in line and time.monotonic() < deadline, (line, done.stderr)
            time.sleep(0.5)
        status, headers, body = response_shape(done.stdout)
        want_status, want_headers, want_body = response_shape(printed)
        assert status == want_status and want_headers <= headers, (command, done.stdout)
        assert body == want_body, (command, done.stdout)


def test_readme_never_expects_the_venv_on_path() -> None:
    """Every command line of the README's shell blocks runs `model-broker` by its path, or inside a pod."""
    text = quickstart.README.read_text(encoding="utf-8")
    lines = [
        line
        for language, body in quickstart.FENCE.findall(text)
        if language in {"bash", "console", "sh"}
        for line in quickstart.commands(body.replace("$ ", ""))
    ]
    assert any(".venv/bin/model-broker" in line for line in lines)
    bare = [line for line in lines if "model-broker" in line.split() and " exec " not in line]
    assert not bare, bare
