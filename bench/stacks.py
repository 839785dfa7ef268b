"""The configurations under test, each a context manager that starts it on loopback and yields a `Target`.

Everything shares one Redis and one model backend, so the configurations differ
only in what sits between wrk and the model.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import redis
import yaml

from bench import configs, workload
from bench.procs import log_tail, process_group, wait_for_line
from extproc.launcher import envoy_binary, free_port, free_port_run, wait_ready
from extproc.registry import Registry, load_registry

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class Target:
    """One configuration under load: where to send requests and whose CPU to charge it with."""

    name: str
    label: str
    url: str
    # role ("envoy", "broker", "gateway", "model") → root pids; their descendants count too.
    cpu_roots: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    # Whether the model should see injected features (plain Envoy does not enrich).
    enriches: bool = True


@dataclass(frozen=True, slots=True)
class Shared:
    """What every configuration uses: the work directory, Redis, the model backend, worker counts."""

    workdir: Path
    redis_url: str
    backend_port: int
    backend_pid: int
    redis_pid: int
    broker_workers: int
    gateway_workers: int
    envoy_concurrency: int

    @property
    def common_roots(self) -> dict[str, tuple[int, ...]]:
        """Processes every configuration loads: their CPU is charged to whichever runs."""
        return {"model": (self.backend_pid,), "redis": (self.redis_pid,)}

    @property
    def backend_url(self) -> str:
        return f"http://127.0.0.1:{self.backend_port}{workload.BACKEND_PATH}"


def child_env(**extra: str) -> dict[str, str]:
    """Children import `bench` and `extproc` from this checkout."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), **extra)
    env.pop("PYTHONSTARTUP", None)
    return env


def _not_started(what: str, *logs: Path) -> NoReturn:
    """Turn a readiness failure into one error that shows the children's logs (the work dir is deleted)."""
    tails = "".join(f"\n--- last lines of {log.name}:\n{log_tail(log)}" for log in logs)
    raise RuntimeError(f"{what} did not start{tails}")


def wait_listening(ports: list[int], timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    for port in ports:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nothing listening on 127.0.0.1:{port}") from None
                time.sleep(0.1)


def post(url: str, body: bytes, timeout_s: float = 5.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"content-type": workload.JSON}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[tuple[str, int]]:
    """A throwaway redis-server on a free loopback port, no persistence, seeded; yields (url, pid)."""
    port = free_port()
    log = workdir / "redis.log"
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with process_group(cmd, log, cwd=workdir) as proc:
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url, socket_timeout=2)
        try:
            _seed(client)
        except redis.RedisError:
            _not_started("redis-server", log)
        finally:
            client.close()
        yield url, proc.pid


def _seed(client: redis.Redis) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    pipe = client.pipeline(transaction=False)
    for index in range(1, workload.CUSTOMERS + 1):
        features = workload.customer_features(index)  # copied below: redis-py types the mapping invariantly
        pipe.hset(workload.store_key(workload.customer_id(index)), mapping={k: v for k, v in features.items()})
    pipe.execute()


def write_registry(
    workdir: Path, name: str, *, redis_url: str, backend_port: int, workers: int, cache_ttl_s: float
) -> Path:
    doc = configs.registry_doc(
        listener=free_port(),
        admin=free_port(),
        metrics=free_port(),
        broker=free_port_run(workers),
        workers=workers,
        backend=backend_port,
        redis_url=redis_url,
        cache_ttl_s=cache_ttl_s,
    )
    path = workdir / f"{name}.registry.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


@contextlib.contextmanager
def model_backend(workdir: Path, redis_url: str) -> Iterator[tuple[int, int]]:
    """The demo model (reads the whole body, answers JSON) on one port; yields (port, pid)."""
    port = free_port()
    config = write_registry(workdir, "backend", redis_url=redis_url, backend_port=port, workers=1, cache_ttl_s=0)
    log = workdir / "backend.log"
    cmd = [sys.executable, "-m", "extproc.cli", "demo-models", "--config", str(config)]
    with process_group(cmd, log, env=child_env(), cwd=ROOT) as proc:
        try:
            wait_listening([port])
        except RuntimeError:
            _not_started("the model backend", log)
        yield port, proc.pid


def _envoy_cmd(config: Path, concurrency: int) -> list[str]:
    return [
        envoy_binary(),
        "-c",
        str(config),
        "--log-level",
        "warn",
        "--disable-hot-restart",  # several Envoys at once
        "--concurrency",
        str(concurrency),
    ]


@contextlib.contextmanager
def plain_envoy(shared: Shared) -> Iterator[Target]:
    """(a) Envoy → model, same routes and clusters as the broker's Envoy, no ext_proc."""
    config = write_registry(
        shared.workdir, "plain", redis_url=shared.redis_url, backend_port=shared.backend_port, workers=1, cache_ttl_s=0
    )
    registry = load_registry(config)
    listener, admin = free_port(), free_port()
    envoy_yaml = shared.workdir / "plain.envoy.yaml"
    envoy_yaml.write_text(configs.plain_envoy_yaml(registry, listener, admin), encoding="utf-8")
    log = shared.workdir / "plain.envoy.log"
    with process_group(_envoy_cmd(envoy_yaml, shared.envoy_concurrency), log) as envoy:
        try:
            wait_ready(f"http://127.0.0.1:{admin}/ready", START_TIMEOUT_S)
        except RuntimeError:
            _not_started("plain Envoy", log)
        yield Target(
            name="envoy",
            label="(a) plain Envoy",
            url=f"http://127.0.0.1:{listener}{workload.MODEL_PATH}",
            cpu_roots={"envoy": (envoy.pid,), **shared.common_roots},
            enriches=False,
        )


@contextlib.contextmanager
def broker(
    shared: Shared, name: str, label: str, *, cache_ttl_s: float, header_phase: bool = False
) -> Iterator[Target]:
    """(b) Envoy + broker workers → model, features from Redis through the broker's TTL cache."""
    config = write_registry(
        shared.workdir,
        name,
        redis_url=shared.redis_url,
        backend_port=shared.backend_port,
        workers=shared.broker_workers,
        cache_ttl_s=cache_ttl_s,
    )
    registry: Registry = load_registry(config)
    envoy_yaml = shared.workdir / f"{name}.envoy.yaml"
    envoy_yaml.write_text(
        configs.broker_envoy_yaml(registry, shared.broker_workers, header_phase=header_phase), encoding="utf-8"
    )
    serve = [
        sys.executable,
        "-m",
        "extproc.cli",
        "serve",
        "--config",
        str(config),
        "--workers",
        str(shared.broker_workers),
    ]
    broker_log, envoy_log = shared.workdir / f"{name}.broker.log", shared.workdir / f"{name}.envoy.log"
    with (
        process_group(serve, broker_log, env=child_env(), cwd=ROOT) as supervisor,
        process_group(_envoy_cmd(envoy_yaml, shared.envoy_concurrency), envoy_log) as envoy,
    ):
        base = f"http://{registry.listener.address}:{registry.listener.port}"
        try:
            # Every worker listening, not just the one that answers the health check.
            wait_listening([registry.broker.port + i for i in range(shared.broker_workers)])
            wait_ready(base + "/healthz", START_TIMEOUT_S)
        except RuntimeError:
            _not_started(label, broker_log, envoy_log)
        yield Target(
            name=name,
            label=label,
            url=base + workload.MODEL_PATH,
            cpu_roots={"envoy": (envoy.pid,), "broker": (supervisor.pid,), **shared.common_roots},
        )


@contextlib.contextmanager
def aiohttp_gateway(shared: Shared) -> Iterator[Target]:
    """(c) A plain aiohttp reverse proxy doing the same enrichment; workers share the port (SO_REUSEPORT)."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "bench.gateways.aiohttp_gateway",
        f"--port={port}",
        f"--redis-url={shared.redis_url}",
        f"--backend-url={shared.backend_url}",
    ]
    log = shared.workdir / "aiohttp.log"
    with contextlib.ExitStack() as stack:
        workers = [
            stack.enter_context(process_group(cmd, log, stdout=subprocess.PIPE, env=child_env(), cwd=ROOT))
            for _ in range(shared.gateway_workers)
        ]
        try:
            for worker in workers:
                assert worker.stdout is not None
                wait_for_line(worker.stdout, b"ready", START_TIMEOUT_S)
        except RuntimeError:
            _not_started("the aiohttp gateway", log)
        yield Target(
            name="aiohttp",
            label="(c) aiohttp gateway",
            url=f"http://127.0.0.1:{port}{workload.MODEL_PATH}",
            cpu_roots={"gateway": tuple(w.pid for w in workers), **shared.common_roots},
        )


@contextlib.contextmanager
def fastapi_gateway(shared: Shared) -> Iterator[Target]:
    """(d) FastAPI + httpx under uvicorn with its own worker processes."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "bench.gateways.fastapi_gateway:app",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--workers={shared.gateway_workers}",
        "--loop=uvloop",
        "--http=httptools",
        "--no-access-log",
        "--log-level=warning",
    ]
    env = child_env(BENCH_REDIS_URL=shared.redis_url, BENCH_BACKEND_URL=shared.backend_url)
    log = shared.workdir / "fastapi.log"
    with process_group(cmd, log, env=env, cwd=ROOT) as uvicorn:
        try:
            wait_ready(f"http://127.0.0.1:{port}/healthz", START_TIMEOUT_S)
        except RuntimeError:
            _not_started("the FastAPI gateway", log)
        yield Target(
            name="fastapi",
            label="(d) FastAPI + httpx gateway",
            url=f"http://127.0.0.1:{port}{workload.MODEL_PATH}",
            cpu_roots={"gateway": (uvicorn.pid,), **shared.common_roots},
        )


def preflight(target: Target) -> None:
    """One request before any load: 200, and the model saw exactly the seeded features (or none)."""
    index = 7
    status, body = post(target.url, workload.request_body(index))
    if status != 200:
        raise RuntimeError(f"{target.label}: preflight got {status}: {body[:300]!r}")
    seen = json.loads(body).get(workload.INJECT_AS)
    expected = workload.customer_features(index) if target.enriches else {}
    if seen != expected:
        raise RuntimeError(f"{target.label}: the model saw features {seen!r}, expected {expected!r}")
