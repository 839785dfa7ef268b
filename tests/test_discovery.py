"""How the CLI finds a local broker's admin API and token: announcements in the runtime directory."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from extproc.rollout.discovery import RUNTIME_DIR_ENV, AdminEndpoint, announce, announced_for, runtime_dir

ANNOUNCED = "http://127.0.0.1:19466"


@pytest.fixture
def announced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AdminEndpoint:
    monkeypatch.setenv(RUNTIME_DIR_ENV, str(tmp_path))
    endpoint = AdminEndpoint(ANNOUNCED, "the-token", os.getpid(), "/demo/registry.yaml")
    announce(endpoint)
    return endpoint


@pytest.mark.parametrize(
    ("url", "found"),
    [
        (ANNOUNCED, True),
        ("http://127.0.0.1:19466/", True),
        ("http://localhost:19466", True),
        ("http://[::1]:19466", True),
        ("http://0.0.0.0:19466/weights", True),
        ("http://127.0.0.1:19467", False),
        ("https://127.0.0.1:19466", False),
        ("http://broker.example.com:19466", False),
        ("http://127.0.0.1:notaport", False),
        ("not a url", False),
    ],
    ids=[
        "same",
        "trailing-slash",
        "localhost",
        "ipv6-loopback",
        "any-address",
        "other-port",
        "other-scheme",
        "other-host",
        "bad-port",
        "garbage",
    ],
)
def test_an_admin_url_finds_the_broker_announced_for_it(announced: AdminEndpoint, url: str, found: bool) -> None:
    """Any name of this machine with the announced scheme and port finds the announcement (and its token)."""
    assert (announced_for(url) == announced) is found


def test_a_dead_brokers_announcement_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An announcement left by a process that no longer runs gives no token."""
    monkeypatch.setenv(RUNTIME_DIR_ENV, str(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait()
    announce(AdminEndpoint(ANNOUNCED, "stale", gone.pid, "/demo/registry.yaml"))
    assert announced_for(ANNOUNCED) is None


def test_the_tests_announce_in_their_own_runtime_dir() -> None:
    """A test run's brokers never show up in the user's runtime directory (conftest sets its own)."""
    users = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    assert os.environ[RUNTIME_DIR_ENV] == str(runtime_dir())
    assert not runtime_dir().is_relative_to(users / "model-broker")
    assert runtime_dir() != users / f"model-broker-{os.getuid()}"
