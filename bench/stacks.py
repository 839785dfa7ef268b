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
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

import redis
import yaml

from bench import configs, workload
from bench.audit import AWS_ENV, BUCKET, TABLE, AuditTrail, moto_server
from bench.procs import log_tail, process_group, stop_on_sigterm, wait_for_line
from extproc.process.launcher import ENVOY_LOG_ARGS, envoy_binary, free_port, free_port_run, wait_ready
from extproc.registry import Registry, load_registry
from extproc.rollout.discovery import RUNTIME_DIR_ENV

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
    # Ensembles: how many members answer, each with its own output (0: a single model call).
    members: int = 0
    # `feast serve`: the lookup answered by Feast's feature server itself, no model call.
    feast_serve: bool = False
    # Audited configurations: the spool each run waits on, and the sink the preflight reads back.
    audit: AuditTrail | None = None
    # Shown when the preflight fails (the work directory is deleted on exit).
    logs: tuple[Path, ...] = ()
    # Derived features (issue 19) the model also sees beside the seeded ones.
    derived: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        return urllib.parse.urlsplit(self.url).path


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


@contextlib.contextmanager
def starting(what: str, *logs: Path) -> Iterator[None]:
    """A readiness wait whose failure becomes `_not_started`: one error, with the children's logs."""
    try:
        yield
    except RuntimeError:
        _not_started(what, *logs)


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


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    request_id: str | None


def post(url: str, body: bytes, timeout_s: float = 5.0) -> Reply:
    request = urllib.request.Request(url, data=body, headers={"content-type": workload.JSON}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return Reply(resp.status, resp.read(), resp.headers.get("x-request-id"))
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, exc.read(), exc.headers.get("x-request-id"))


def start_shared(
    stack: contextlib.ExitStack, workdir: Path, *, broker_workers: int, gateway_workers: int, envoy_concurrency: int
) -> Shared:
    """Redis and the model backend for every configuration, stopped when `stack` closes."""
    redis_url, redis_pid = stack.enter_context(redis_server(workdir))
    backend_port, backend_pid = stack.enter_context(model_backend(workdir, redis_url))
    return Shared(
        workdir=workdir,
        redis_url=redis_url,
        backend_port=backend_port,
        backend_pid=backend_pid,
        redis_pid=redis_pid,
        broker_workers=broker_workers,
        gateway_workers=gateway_workers,
        envoy_concurrency=envoy_concurrency,
    )


@contextlib.contextmanager
def session(
    name: str, *, broker_workers: int, gateway_workers: int, envoy_concurrency: int
) -> Iterator[tuple[contextlib.ExitStack, Shared]]:
    """A run's scratch folder and shared services; SIGTERM unwinds it like Ctrl-C, so nothing is left running."""
    with (
        stop_on_sigterm(),
        tempfile.TemporaryDirectory(prefix=f"model-broker-{name}-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        yield (
            stack,
            start_shared(
                stack,
                Path(tmp),
                broker_workers=broker_workers,
                gateway_workers=gateway_workers,
                envoy_concurrency=envoy_concurrency,
            ),
        )


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


# Adds a variant's sections (audit, ensembles) to the bench registry document, in place.
Extend = Callable[[dict[str, Any]], None]


def write_registry(
    workdir: Path,
    name: str,
    *,
    redis_url: str,
    backend_port: int,
    workers: int,
    cache_ttl_s: float,
    extend: Extend | None = None,
    transport: str = "auto",
) -> Path:
    doc = configs.registry_doc(
        listener=free_port(),
        admin=free_port(),
        metrics=free_port(),
        control_plane=free_port(),
        control_plane_admin=free_port(),
        broker=free_port_run(workers),
        broker_http=free_port_run(workers),
        workers=workers,
        backend=backend_port,
        redis_url=redis_url,
        cache_ttl_s=cache_ttl_s,
        transport=transport,
    )
    if extend is not None:
        extend(doc)
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
        with starting("the model backend", log):
            wait_listening([port])
        yield port, proc.pid


def _envoy_cmd(config: Path, concurrency: int) -> list[str]:
    return [
        envoy_binary(),
        "-c",
        str(config),
        *ENVOY_LOG_ARGS,  # as `up` runs it: a log line per failed broker call would cost CPU under load
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
        with starting("plain Envoy", log):
            wait_ready(f"http://127.0.0.1:{admin}/ready", START_TIMEOUT_S)
        yield Target(
            name="envoy",
            label="(a) plain Envoy",
            url=f"http://127.0.0.1:{listener}{workload.MODEL_PATH}",
            cpu_roots={"envoy": (envoy.pid,), **shared.common_roots},
            enriches=False,
            logs=(log,),
        )


@dataclass(frozen=True, slots=True)
class RunningBroker:
    """Envoy + broker up and answering: the public base URL and the CPU roots of both."""

    base: str
    cpu_roots: dict[str, tuple[int, ...]]
    logs: tuple[Path, ...]


@contextlib.contextmanager
def run_broker(
    shared: Shared,
    name: str,
    label: str,
    config: Path,
    *,
    header_phase: bool = False,
    env: Mapping[str, str] | None = None,
    unix: bool = True,
) -> Iterator[RunningBroker]:
    """The broker supervisor and its Envoy for the registry at `config`, until the block ends.

    `unix`: Envoy reaches the workers over Unix sockets, as `up` does on one host; else over TCP
    (Envoy and broker in different pods).
    """
    registry: Registry = load_registry(config)
    envoy_yaml = shared.workdir / f"{name}.envoy.yaml"
    socket_dir = shared.workdir / f"{name}-sockets"
    socket_dir.mkdir()
    sockets = str(socket_dir) if unix else None
    envoy_yaml.write_text(
        configs.broker_envoy_yaml(registry, shared.broker_workers, header_phase=header_phase, socket_dir=sockets),
        encoding="utf-8",
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
        *(["--socket-dir", sockets] if sockets else []),
    ]
    broker_log, envoy_log = shared.workdir / f"{name}.broker.log", shared.workdir / f"{name}.envoy.log"
    # The control plane announces itself (admin URL and token) there: inside the work dir, deleted on exit.
    runtime = {RUNTIME_DIR_ENV: str(shared.workdir / "runtime")}
    with (
        process_group(serve, broker_log, env=child_env(**runtime, **(env or {})), cwd=ROOT) as supervisor,
        process_group(_envoy_cmd(envoy_yaml, shared.envoy_concurrency), envoy_log) as envoy,
    ):
        base = f"http://{registry.listener.address}:{registry.listener.port}"
        with starting(label, broker_log, envoy_log):
            # Every worker listening, not just the one that answers the health check.
            wait_listening([registry.broker.port + i for i in range(shared.broker_workers)])
            wait_ready(base + "/healthz", START_TIMEOUT_S)
        yield RunningBroker(base, {"envoy": (envoy.pid,), "broker": (supervisor.pid,)}, (broker_log, envoy_log))


def variant_registry(
    shared: Shared, name: str, *, cache_ttl_s: float = 5, extend: Extend | None = None, transport: str = "auto"
) -> Path:
    return write_registry(
        shared.workdir,
        name,
        redis_url=shared.redis_url,
        backend_port=shared.backend_port,
        workers=shared.broker_workers,
        cache_ttl_s=cache_ttl_s,
        extend=extend,
        transport=transport,
    )


@contextlib.contextmanager
def broker(
    shared: Shared,
    name: str,
    label: str,
    *,
    cache_ttl_s: float,
    header_phase: bool = False,
    transport: str = "auto",
    unix: bool = True,
    extend: Extend | None = None,
) -> Iterator[Target]:
    """(b) Envoy + broker workers → model, features from Redis through the broker's TTL cache."""
    config = variant_registry(shared, name, cache_ttl_s=cache_ttl_s, transport=transport, extend=extend)
    derived = tuple(d.name for d in load_registry(config).models[0].derived)
    with run_broker(shared, name, label, config, header_phase=header_phase, unix=unix) as running:
        yield Target(
            name=name,
            label=label,
            url=running.base + workload.MODEL_PATH,
            cpu_roots={**running.cpu_roots, **shared.common_roots},
            logs=running.logs,
            derived=derived,
        )


@contextlib.contextmanager
def broker_audit(
    shared: Shared, name: str, label: str, *, sink: Literal["moto", "jsonl"], transport: str = "auto"
) -> Iterator[Target]:
    """(b) with every execution audited: spooled before release, shipped to moto (S3 + DynamoDB) or JSONL files."""
    with contextlib.ExitStack() as stack:
        sink_doc, sink_roots = _audit_sink(stack, shared, name, sink)
        spool = shared.workdir / f"{name}.spool"
        section = configs.audit_section(spool, sink_doc)
        config = variant_registry(shared, name, extend=lambda doc: doc.update(audit=section), transport=transport)
        trail = AuditTrail(spool, config, child_env(**AWS_ENV))
        if sink == "moto":
            trail.init()
        running = stack.enter_context(run_broker(shared, name, label, config, env=AWS_ENV))
        yield Target(
            name=name,
            label=label,
            url=running.base + workload.MODEL_PATH,
            cpu_roots={**running.cpu_roots, **shared.common_roots, **sink_roots},
            audit=trail,
            logs=running.logs,
        )


def _audit_sink(
    stack: contextlib.ExitStack, shared: Shared, name: str, sink: Literal["moto", "jsonl"]
) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """The registry's `audit.sink` and the CPU roots it adds: moto runs, on its own port, for "moto" only."""
    if sink == "jsonl":
        return configs.local_sink(shared.workdir / f"{name}.records"), {}
    port, log = free_port(), shared.workdir / "moto.log"
    moto = stack.enter_context(moto_server(log, port, child_env(**AWS_ENV)))
    with starting("moto_server", log):
        wait_listening([port])
    return configs.aws_sink(endpoint_url=moto.url, bucket=BUCKET, table=TABLE), {"aws": (moto.pid,)}


@contextlib.contextmanager
def ensemble(shared: Shared, name: str, label: str, *, members: int) -> Iterator[Target]:
    """(e) One POST, `members` copies of the model called concurrently through Envoy's egress listener."""
    egress = free_port()
    config = variant_registry(
        shared, name, extend=lambda doc: configs.add_ensemble(doc, members=members, egress=egress)
    )
    with run_broker(shared, name, label, config) as running:
        yield Target(
            name=name,
            label=label,
            url=running.base + workload.ENSEMBLE_PATH,
            cpu_roots={**running.cpu_roots, **shared.common_roots},
            members=members,
            logs=running.logs,
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
        with starting("the aiohttp gateway", log):
            for worker in workers:
                assert worker.stdout is not None
                wait_for_line(worker.stdout, b"ready", START_TIMEOUT_S)
        yield Target(
            name="aiohttp",
            label="(c) aiohttp gateway",
            url=f"http://127.0.0.1:{port}{workload.MODEL_PATH}",
            cpu_roots={"gateway": tuple(w.pid for w in workers), **shared.common_roots},
            logs=(log,),
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
        with starting("the FastAPI gateway", log):
            wait_ready(f"http://127.0.0.1:{port}/healthz", START_TIMEOUT_S)
        yield Target(
            name="fastapi",
            label="(d) FastAPI + httpx gateway",
            url=f"http://127.0.0.1:{port}{workload.MODEL_PATH}",
            cpu_roots={"gateway": (uvicorn.pid,), **shared.common_roots},
            logs=(log,),
        )


def preflight(target: Target) -> None:
    """One request before any load: 200, the model saw exactly the seeded features (or none), and,
    when audited, that request's record reached the sink with those features. A failure shows the logs.
    """
    try:
        _preflight(target)
    except RuntimeError as exc:
        tails = "".join(f"\n--- last lines of {log.name}:\n{log_tail(log)}" for log in target.logs)
        raise RuntimeError(f"{target.label}: {exc}{tails}") from None


def _preflight(target: Target) -> None:
    index = 7
    if target.feast_serve:
        _preflight_feast_serve(target, index)
        return
    reply = post(target.url, workload.request_body(index))
    if reply.status != 200:
        raise RuntimeError(f"preflight got {reply.status}: {reply.body[:300]!r}")
    expected = workload.customer_features(index) if target.enriches else {}
    for seen in _features_seen(target, json.loads(reply.body)):
        missing = [name for name in target.derived if name not in (seen or {})]
        if missing:
            raise RuntimeError(f"the model saw no derived {missing} in {seen!r}")
        stored = {k: v for k, v in seen.items() if k not in target.derived} if target.derived else seen
        if stored != expected:
            raise RuntimeError(f"the model saw features {stored!r}, expected {expected!r}")
    if target.audit is not None:
        _check_audited(target.audit, reply.request_id, expected)


def _preflight_feast_serve(target: Target, index: int) -> None:
    """Feast's answer: the requested features' values for the customer, all PRESENT."""
    reply = post(target.url, workload.feast_body(index), timeout_s=30)
    if reply.status != 200:
        raise RuntimeError(f"preflight got {reply.status}: {reply.body[:300]!r}")
    answer = json.loads(reply.body)
    names = answer["metadata"]["feature_names"]
    seen = {name: result["values"][0] for name, result in zip(names, answer["results"], strict=True)}
    expected = {workload.JOIN_KEY: workload.customer_id(index), **workload.customer_features(index)}
    if seen != expected:
        raise RuntimeError(f"feast serve answered {seen!r}, expected {expected!r}")


def _features_seen(target: Target, answer: dict[str, Any]) -> list[Any]:
    """What each model call echoed back: the answer itself, or every ensemble member's output."""
    if not target.members:
        return [answer.get(workload.INJECT_AS)]
    results, errors = answer.get("results") or {}, answer.get("errors")
    if len(results) != target.members or errors:
        raise RuntimeError(f"expected {target.members} results and no errors, got {answer!r}")
    return [result["output"].get(workload.INJECT_AS) for result in results.values()]


def _check_audited(trail: AuditTrail, request_id: str | None, expected: dict[str, Any]) -> None:
    if request_id is None:
        raise RuntimeError("no x-request-id on the preflight answer")
    trail.settle()
    record = trail.show(request_id)
    if record.get("features") != expected or (record.get("response") or {}).get("status") != 200:
        raise RuntimeError(f"unexpected audit record for the preflight request: {record!r}")
