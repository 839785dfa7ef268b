"""Who may call which model, through a real Envoy over TLS: 401, 403, 429, spoofing, admin, the broker's view."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from extproc.audit.local import LocalAuditStore
from extproc.registry import hash_api_key
from tests.conftest import ClientOptions, Stack, demo_registry_doc, run_stack
from tests.credentials import Signer, self_signed_pair
from tests.http import JSON_HEADERS, Reply, call

CREDIT = "/v1/models/credit-risk/predict"
FRAUD = "/v1/models/fraud/predict"
UNDERWRITING = "/v1/ensembles/underwriting/predict"
ISSUER = "https://idp.example.test"
AUDIENCE = "model-broker"
# Keys around SHA-256's padding boundaries (55/56 and 119/120 bytes), hashed by Envoy's Lua.
ODD_KEYS = ["k", "a" * 55, "b" * 56, "c" * 63, "d" * 64, "e" * 119, "f" * 120, "g" * 300, "ключ-🔑"]
BODY = {"customer_id": "c-1", "amount": 10}


def key(name: str) -> dict[str, str]:
    return {**JSON_HEADERS, "x-api-key": f"{name}-secret"}


def bearer(token: str) -> dict[str, str]:
    return {**JSON_HEADERS, "authorization": f"Bearer {token}"}


def auth_registry(workdir: Path, signer: Signer) -> dict[str, Any]:
    """The demo (two models, one ensemble) plus six consumers (keys, JWT, admin, rate-limited) and TLS."""
    doc = demo_registry_doc()
    doc["broker"]["workers"] = 1
    # Only fraud is audited: on audited routes even refusals reach the broker (response phase).
    doc["models"][1]["audit"] = True
    doc["audit"] = {
        "enabled": False,
        "spool": {"dir": str(workdir / "spool"), "seal_after_ms": 200},
        "sink": {"local": {"dir": str(workdir / "audit")}},
        "ship_interval_ms": 100,
    }
    jwks = workdir / "jwks.json"
    jwks.write_text(json.dumps(signer.jwks()))
    cert, private_key = self_signed_pair(workdir)
    doc["listener"]["tls"] = {"certificate_chain": str(cert), "private_key": str(private_key)}
    doc["admin"]["public_endpoints"] = True
    # The 401 cases here come from one address; the per-address guard is tested in test_overload.
    doc["limits"]["unauthenticated"] = {"requests": 1000, "unit": "second"}

    def hashes(name: str) -> list[str]:
        return [hash_api_key(f"{name}-secret")]

    doc["consumers"] = [
        {"name": "alice", "api_keys": hashes("alice"), "models": ["credit-risk", "underwriting"]},
        {"name": "bob", "api_keys": hashes("bob"), "models": ["fraud"]},
        {"name": "ops", "api_keys": hashes("ops"), "models": [], "admin": True},
        {
            "name": "limited",
            "api_keys": hashes("limited"),
            "models": ["*"],
            "rate_limit": {"requests": 2, "unit": "minute"},
        },
        {"name": "odd", "api_keys": [hash_api_key(k) for k in ODD_KEYS], "models": ["*"]},
        {
            "name": "svc",
            "jwt": {"issuer": ISSUER, "audiences": [AUDIENCE], "jwks_file": str(jwks)},
            "models": ["credit-risk"],
        },
    ]
    return doc


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer.new("test-key")


@pytest.fixture(scope="module")
def auth_stack(signer: Signer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("auth")
    with run_stack(auth_registry(workdir, signer), workdir / "stack") as stack:
        yield stack


@pytest.fixture
def client_options(auth_stack: Stack) -> ClientOptions:
    # The auth stack listens on TLS with a self-signed certificate.
    return ClientOptions(tls_context=auth_stack.ssl_context())


async def broker_streams(session: aiohttp.ClientSession, stack: Stack) -> int:
    """gRPC streams Envoy opened to the broker so far, from its admin stats."""
    async with session.get(f"{stack.admin}/stats?filter=^cluster.model_broker_ext_proc.upstream_rq_total$") as resp:
        return int(re.findall(r": (\d+)", await resp.text())[0])


REFUSED: list[tuple[str, str, dict[str, str], int, str]] = [
    ("no-credential", CREDIT, JSON_HEADERS, 401, "unauthenticated"),
    ("wrong-key", CREDIT, {**JSON_HEADERS, "x-api-key": "guess"}, 401, "unauthenticated"),
    ("empty-key", CREDIT, {**JSON_HEADERS, "x-api-key": ""}, 401, "unauthenticated"),
    ("spoofed-consumer-header-alone", CREDIT, {**JSON_HEADERS, "x-broker-consumer": "alice"}, 401, "unauthenticated"),
    ("other-model", CREDIT, key("bob"), 403, "forbidden"),
    ("ensemble-not-listed", UNDERWRITING, key("bob"), 403, "forbidden"),
    ("admin-is-not-a-model-caller", CREDIT, key("ops"), 403, "forbidden"),
]


@pytest.mark.parametrize(("case", "path", "headers", "status", "code"), REFUSED, ids=[r[0] for r in REFUSED])
async def test_refused_in_envoy_with_json_and_no_broker_call(
    auth_stack: Stack,
    session: aiohttp.ClientSession,
    case: str,
    path: str,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    """401/403 with the error shape, answered by Envoy before any broker call."""
    before = await broker_streams(session, auth_stack)
    reply = await call(session, auth_stack.base + path, BODY, headers=headers)
    assert reply.status == status, (case, reply.raw)
    assert reply.error_code() == code
    assert reply.body["error"]["request_id"] == reply.headers["x-request-id"]
    assert await broker_streams(session, auth_stack) == before


async def test_allowed_consumer_reaches_its_models(auth_stack: Stack, session: aiohttp.ClientSession) -> None:
    """A valid key reaches exactly the models and ensembles in its allow-list; the model learns who called."""
    alice = await call(session, auth_stack.base + CREDIT, BODY, headers=key("alice"))
    bob = await call(session, auth_stack.base + FRAUD, BODY, headers=key("bob"))
    assert (alice.status, bob.status) == (200, 200), (alice.raw, bob.raw)
    assert alice.body["consumer"] == "alice" and alice.body["features"]["income"]
    assert bob.body["consumer"] == "bob" and bob.body["model"] == "fraud"
    ensemble = await call(session, auth_stack.base + UNDERWRITING, BODY, headers=key("alice"))
    assert ensemble.status == 200, ensemble.raw


async def test_spoofed_consumer_header_is_replaced(auth_stack: Stack, session: aiohttp.ClientSession) -> None:
    """A client claiming another consumer in x-broker-consumer is who its key says."""
    spoof = {**key("alice"), "x-broker-consumer": "ops"}
    reply = await call(session, auth_stack.base + CREDIT, BODY, headers=spoof)
    assert reply.status == 200, reply.raw
    assert reply.body["consumer"] == "alice"


async def test_api_key_hashing_matches_hashlib(auth_stack: Stack, session: aiohttp.ClientSession) -> None:
    """Envoy's Lua SHA-256 agrees with hashlib on keys around every padding boundary."""
    for odd in ODD_KEYS:
        reply = await call(session, auth_stack.base + CREDIT, BODY, headers={**JSON_HEADERS, "x-api-key": odd})
        assert reply.status == 200, (len(odd.encode()), reply.raw)
        assert reply.body["consumer"] == "odd"


async def test_valid_jwt_is_its_consumer(auth_stack: Stack, session: aiohttp.ClientSession, signer: Signer) -> None:
    """A token signed by the consumer's JWKS key, for its issuer and audience, is that consumer."""
    reply = await call(session, auth_stack.base + CREDIT, BODY, headers=bearer(signer.token(ISSUER, AUDIENCE)))
    assert reply.status == 200, reply.raw
    assert reply.body["consumer"] == "svc"
    fraud = await call(session, auth_stack.base + FRAUD, BODY, headers=bearer(signer.token(ISSUER, AUDIENCE)))
    assert fraud.status == 403 and fraud.error_code() == "forbidden"


def bad_tokens(signer: Signer) -> list[tuple[str, str]]:
    forger = Signer.new(signer.kid)  # same key id, different key: a forged signature
    return [
        # Envoy allows 60 s of clock skew by default.
        ("expired", signer.token(ISSUER, AUDIENCE, ttl_s=-120)),
        ("no-exp", signer.token(ISSUER, AUDIENCE, ttl_s=None)),
        # Past jwt.max_lifetime_seconds (a day by default): a leaked token must not live for weeks.
        ("too-long-lived", signer.token(ISSUER, AUDIENCE, ttl_s=3 * 86_400)),
        ("forged", forger.token(ISSUER, AUDIENCE)),
        ("wrong-audience", signer.token(ISSUER, "someone-else")),
        ("unknown-issuer", signer.token("https://evil.example", AUDIENCE)),
        ("garbage", "not.a.jwt"),
    ]


async def test_bad_jwts_are_401(auth_stack: Stack, session: aiohttp.ClientSession, signer: Signer) -> None:
    """Expired, exp-less, too long-lived, forged, mis-addressed or malformed tokens: 401 JSON, even beside a key."""
    for case, token in bad_tokens(signer):
        for headers in (bearer(token), {**bearer(token), "x-api-key": "alice-secret"}):
            reply = await call(session, auth_stack.base + CREDIT, BODY, headers=headers)
            assert reply.status == 401, (case, reply.raw)
            assert reply.error_code() == "unauthenticated"


async def test_rate_limit_429_with_retry_after(auth_stack: Stack, session: aiohttp.ClientSession) -> None:
    """Under the limit 200; over it 429 JSON with retry-after; other consumers are not affected."""
    replies = [await call(session, auth_stack.base + CREDIT, BODY, headers=key("limited")) for _ in range(3)]
    assert [r.status for r in replies] == [200, 200, 429], [r.raw for r in replies]
    limited = replies[-1]
    assert limited.error_code() == "rate_limited"
    assert limited.headers["retry-after"] == "30"  # 2 per minute: a token every 30 s
    assert (await call(session, auth_stack.base + CREDIT, BODY, headers=key("alice"))).status == 200


async def test_admin_endpoint_needs_an_admin_consumer(auth_stack: Stack, session: aiohttp.ClientSession) -> None:
    """GET /models (declared public here): 401 anonymous, 403 for a model caller, 200 for an admin."""
    url = auth_stack.base + "/models"
    anonymous = await call(session, url, method="GET")
    caller = await call(session, url, method="GET", headers=key("alice"))
    admin = await call(session, url, method="GET", headers=key("ops"))
    assert (anonymous.status, caller.status, admin.status) == (401, 403, 200), admin.raw
    assert [m["name"] for m in admin.body["models"]] == ["credit-risk", "fraud"]
    assert [e["name"] for e in admin.body["ensembles"]] == ["underwriting"]
    health = await call(session, auth_stack.base + "/healthz", method="GET")
    assert health.status == 200, "probes need no credential"


async def test_tls_handshake_and_plaintext_refused(auth_stack: Stack) -> None:
    """The listener speaks TLS with the declared certificate (h2 by ALPN) and refuses plain HTTP."""
    port = auth_stack.doc["listener"]["port"]
    context = auth_stack.ssl_context()
    assert context is not None
    context.set_alpn_protocols(["h2", "http/1.1"])

    def handshake() -> tuple[str | None, str | None]:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            return tls.version(), tls.selected_alpn_protocol()

    version, alpn = await asyncio.to_thread(handshake)
    assert version in {"TLSv1.2", "TLSv1.3"} and alpn == "h2"

    def plaintext() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            raw.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            try:
                return raw.recv(100)
            except ConnectionResetError:
                return b""

    assert not (await asyncio.to_thread(plaintext)).startswith(b"HTTP/")


async def test_audit_record_names_the_verified_consumer(auth_stack: Stack, session: aiohttp.ClientSession) -> None:
    """Audit records carry the consumer Envoy verified (not the one claimed): calls, refusals, ensemble members."""
    store = LocalAuditStore(Path(auth_stack.doc["audit"]["sink"]["local"]["dir"]))

    async def record_of(reply: Reply) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + 10
        while (record := store.show(reply.headers["x-request-id"])) is None:
            assert asyncio.get_running_loop().time() < deadline, "no audit record"
            await asyncio.sleep(0.1)
        return record

    served = await call(session, auth_stack.base + FRAUD, BODY, headers={**key("bob"), "x-broker-consumer": "ops"})
    forbidden = await call(session, auth_stack.base + FRAUD, BODY, headers=key("alice"))
    anonymous = await call(session, auth_stack.base + FRAUD, BODY)
    assert (served.status, forbidden.status, anonymous.status) == (200, 403, 401)
    assert (await record_of(served))["consumer"] == "bob"
    refused = await record_of(forbidden)
    assert (refused["consumer"], refused["response"]["status"]) == ("alice", 403)
    assert (await record_of(anonymous))["consumer"] is None
    ensemble = await call(session, auth_stack.base + UNDERWRITING, BODY, headers=key("alice"))
    assert ensemble.status == 200, ensemble.raw
    parent = ensemble.headers["x-request-id"]
    deadline = asyncio.get_running_loop().time() + 10
    while not (members := [s for s in store.by_model("fraud", "2000", "9999") if s["parent_request_id"] == parent]):
        assert asyncio.get_running_loop().time() < deadline, "no member record"
        await asyncio.sleep(0.1)
    member = store.show(members[0]["request_id"])
    assert member is not None and member["consumer"] == "alice"


async def test_broker_counts_requests_by_verified_consumer(auth_stack: Stack, session: aiohttp.ClientSession) -> None:
    """The broker's request context carries the consumer Envoy verified, not the one a client claims."""
    spoof = {**key("bob"), "x-broker-consumer": "ops"}
    assert (await call(session, auth_stack.base + FRAUD, BODY, headers=spoof)).status == 200
    async with session.get(f"http://127.0.0.1:{auth_stack.doc['metrics']['port']}/metrics") as resp:
        text = await resp.text()
    assert re.search(r'^model_broker_requests_total\{consumer="bob",model="fraud",outcome="ok"\} [1-9]', text, re.M)
    assert 'consumer="ops"' not in text
