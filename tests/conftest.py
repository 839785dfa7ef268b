"""Fixtures that run the real thing: redis-server, the broker, Envoy, demo models.

Every process gets free loopback ports and its own log file; a failing test
prints the logs of the stack it used (pytest shows them under "Captured").
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pluggy
import pytest
import yaml

from extproc.process import launcher
from extproc.process.launcher import envoy_binary, free_port, wait_listening, wait_ready
from extproc.registry import load_registry
from extproc.rollout.discovery import RUNTIME_DIR_ENV

if TYPE_CHECKING:
    from tests.mlflow_server import MlflowServer

ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = ROOT / "extproc" / "demo"


@dataclass
class Proc:
    """A child process in its own process group, with its output in a log file."""

    name: str
    cmd: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        out = self.log.open("ab")
        self.popen = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        return self

    def signal(self, sig: int) -> None:
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.popen is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait()

    def kill(self) -> None:
        """SIGKILL the whole group: nothing gets to clean up."""
        if self.popen is not None:
            self.signal(signal.SIGKILL)
            self.popen.wait()


class RedisServer:
    """A real redis-server on a free port, no persistence."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `make check` (scripts/ensure-system-packages)")
        self.proc = Proc(
            "redis",
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            workdir / "redis.log",
        )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc.start()
        wait_listening(self.port)

    def stop(self) -> None:
        self.proc.stop()

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args], check=True, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip()

    def seed(self, rows: dict[str, dict[str, Any]]) -> None:
        """Load rows with one pipelined redis-cli call."""
        lines = []
        for key, row in rows.items():
            parts = [key, *(x for k, v in row.items() for x in (k, str(v).lower() if isinstance(v, bool) else str(v)))]
            lines.append("HSET " + " ".join(f'"{p}"' for p in parts))
        subprocess.run(
            ["redis-cli", "-p", str(self.port)],
            input="\n".join(lines) + "\n",
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )


def demo_rows() -> dict[str, dict[str, Any]]:
    return dict(yaml.safe_load((DEMO_DIR / "features.json").read_text()))


# The data-plane suite runs on either ext_proc transport (`make test` runs it on both):
# MODEL_BROKER_TEST_TRANSPORT=grpc|http|auto; auto (the default) is http_service where
# the pinned Envoy honours it, which `test_fast_path` pins.
TRANSPORT = os.environ.get("MODEL_BROKER_TEST_TRANSPORT", "auto")


def demo_registry_doc(**overrides: Any) -> dict[str, Any]:
    """The demo registry with free ports on the suite's transport; `overrides` replace top-level sections."""
    doc = launcher.demo_registry_doc(free_port())
    doc["broker"]["transport"] = TRANSPORT
    doc.update(copy.deepcopy(overrides))
    return doc


def logs_of(procs: Iterable[Proc]) -> str:
    """The tail of each process's log, for a failing test's output."""
    return "\n".join(
        f"----- {p.name} ({p.log}) -----\n{p.log.read_text(errors='replace')[-6000:]}" for p in procs if p.log.exists()
    )


@dataclass
class Stack:
    """Envoy + broker + demo models from one registry document."""

    doc: dict[str, Any]
    workdir: Path
    procs: dict[str, Proc] = field(default_factory=dict)
    # False when the backends are real model servers the test started itself (MLServer).
    demo_models: bool = True

    @property
    def config(self) -> Path:
        return self.workdir / "registry.yaml"

    @property
    def base(self) -> str:
        scheme = "https" if self.doc["listener"].get("tls") else "http"
        return f"{scheme}://127.0.0.1:{self.doc['listener']['port']}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """Trusts the listener's (self-signed) certificate when TLS is declared."""
        tls = self.doc["listener"].get("tls")
        return ssl.create_default_context(cafile=tls["certificate_chain"]) if tls else None

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.doc['admin']['port']}"

    def cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "extproc.cli", *args]

    def start(self) -> Stack:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(yaml.safe_dump(self.doc, sort_keys=False))
        registry = load_registry(self.config)
        envoy_yaml = self.workdir / "envoy.yaml"
        with envoy_yaml.open("w") as out:
            subprocess.run(self.cli("envoy-config", "--config", str(self.config)), check=True, stdout=out, timeout=60)
        if self.demo_models:
            self.procs["models"] = Proc(
                "models", self.cli("demo-models", "--config", str(self.config)), self.workdir / "models.log"
            ).start()
        self.start_broker()
        self.procs["envoy"] = Proc(
            "envoy",
            [envoy_binary(), "-c", str(envoy_yaml), *launcher.ENVOY_LOG_ARGS, "--disable-hot-restart"],
            self.workdir / "envoy.log",
        ).start()
        for model in registry.models:
            for version in model.versions:
                if version.backend.service is not None:
                    wait_listening(version.backend.service.port)
        wait_ready(self.base + "/healthz", context=self.ssl_context())
        return self

    def start_broker(self) -> None:
        self.procs["broker"] = Proc(
            "broker", self.cli("serve", "--config", str(self.config)), self.workdir / "broker.log"
        ).start()
        for i in range(self.doc["broker"]["workers"]):
            wait_listening(self.doc["broker"]["port"] + i)

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()

    def logs(self) -> str:
        return logs_of(self.procs.values())


@pytest.fixture(scope="session", autouse=True)
def _own_runtime_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Brokers the tests start announce themselves in a directory of the test run, never in the user's
    (where a demo of theirs may be running: `weights` would find both)."""
    runtime = tmp_path_factory.mktemp("runtime")
    with pytest.MonkeyPatch.context() as env:
        env.setenv(RUNTIME_DIR_ENV, str(runtime))
        yield runtime


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    server.seed(demo_rows())
    yield server
    server.stop()


@pytest.fixture(scope="session")
def feast_python() -> Path:
    """The Feast SDK's own virtualenv (its pins clash with ours), built once per requirements hash."""
    out = subprocess.run(
        [str(ROOT / "scripts" / "feast-venv")], capture_output=True, text=True, timeout=1800, check=False
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return Path(out.stdout.strip()) / "bin" / "python"


@contextlib.contextmanager
def run_stack(doc: dict[str, Any], workdir: Path, *, demo_models: bool = True) -> Iterator[Stack]:
    stack = Stack(doc, workdir, demo_models=demo_models)
    try:
        stack.start()
        yield stack
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def redis_stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The demo registry on the real Redis, with a short cache so outages show quickly."""
    doc = demo_registry_doc(
        feature_store={"redis": {"url": redis_server.url}, "timeout_ms": 1000, "cache": {"ttl_seconds": 0.5}}
    )
    # A generous store budget: a loaded CI box must not turn a slow HMGET into a 503
    # (outages are tested on a stack of their own, by stopping Redis).
    doc["broker"]["message_timeout_ms"] = 1500
    with run_stack(doc, tmp_path_factory.mktemp("redis-stack")) as stack:
        yield stack


@dataclass(frozen=True)
class ClientOptions:
    """How a module's HTTP client (the `session` fixture) differs from the default.

    A module that needs more time, a TLS trust root or its own pool overrides the
    `client_options` fixture with its reason beside it.
    """

    timeout_s: float = 20.0  # total per request, connection included
    force_close: bool = False  # True: a fresh connection per request, nothing pooled
    limit: int = 100  # connections in the pool, aiohttp's default
    tls_context: ssl.SSLContext | None = None  # None: aiohttp's default verification


@pytest.fixture
def client_options() -> ClientOptions:
    """The default HTTP client; override in a module that needs another."""
    return ClientOptions()


@pytest.fixture
async def session(client_options: ClientOptions) -> AsyncIterator[aiohttp.ClientSession]:
    """An aiohttp client per test, made from the module's `client_options`."""
    connector = aiohttp.TCPConnector(
        limit=client_options.limit,
        force_close=client_options.force_close,
        ssl=client_options.tls_context if client_options.tls_context is not None else True,
    )
    timeout = aiohttp.ClientTimeout(total=client_options.timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        yield client


@pytest.fixture(scope="module")
def mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real MLflow tracking server, one per test module (each module's model registry starts empty)."""
    from tests.mlflow_server import MlflowServer  # it imports this module

    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pluggy.Result[pytest.TestReport], None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash[FAILED] = report.failed


FAILED = pytest.StashKey[bool]()


@pytest.fixture(autouse=True)
def _dump_stack_logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """Logs of every stack a failed test used, only on failure (as ai-gateway's tests do)."""
    yield
    if request.node.stash.get(FAILED, False):
        for value in getattr(request.node, "funcargs", {}).values():
            if isinstance(value, Stack):
                print(value.logs())
