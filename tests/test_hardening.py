"""Hostile input, property-based: every body and header either goes through intact or gets the JSON error shape.

Three layers: the pure body functions (many examples), the ext_proc server through
a real gRPC client (fewer), and raw HTTP/1.1 through a real Envoy (fewest).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import HttpBody, ProcessingRequest
from google.protobuf.struct_pb2 import Struct
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc import wire
from extproc.core.body import entity_key, inject_features, parse_json_object
from extproc.core.features import CachedFeatureStore, EmbeddedFeatureStore
from extproc.core.processor import BrokerProcessor
from extproc.errors import BrokerError, ErrorCode
from extproc.process.launcher import free_port
from extproc.registry import parse_registry
from extproc.transport import add_service
from tests.conftest import DEMO_DIR, Stack, demo_registry_doc, run_stack

MAX_DEPTH = 32
BODY_ERRORS = {ErrorCode.INVALID_JSON, ErrorCode.INVALID_BODY}

# JSON values as clients really send them, and then some: huge integers, non-finite
# floats, every Unicode plane (lone surrogates included, as JSON escapes allow).
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(alphabet=st.characters(codec=None), max_size=40)
)
# Feature values as the stores decode them (orjson): 64-bit integers at most.
feature_values = st.dictionaries(
    st.text(max_size=8),
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    max_size=4,
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=40,
)


def dumps_like_a_client(value: Any) -> bytes:
    """Python's json module: writes what orjson refuses (big ints, NaN, surrogates), as sloppy clients do."""
    return json.dumps(value, ensure_ascii=False).encode("utf-8", errors="surrogatepass")


def nested(depth: int) -> bytes:
    return b'{"customer_id": "c-1", "x": ' + b"[" * depth + b"]" * depth + b"}"


def with_duplicates(pairs: list[tuple[str, Any]]) -> bytes:
    """An object text with repeated keys, which JSON parsers resolve differently (orjson: last wins)."""
    return ("{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in pairs) + "}").encode()


def check_parse(raw: bytes) -> dict[str, Any] | BrokerError:
    result = parse_json_object(raw, MAX_DEPTH)
    if isinstance(result, BrokerError):
        assert result.code in BODY_ERRORS, result
        assert result.message and result.status == 400
    else:
        assert isinstance(result, dict)
    return result


@settings(max_examples=600, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_refuse(raw: bytes) -> None:
    """Arbitrary bytes: a dict or a 400 invalid_json/invalid_body, never an exception."""
    check_parse(raw)


@settings(max_examples=600, deadline=None)
@given(json_values, st.text(max_size=12), feature_values)
def test_any_json_value_round_trips_with_features(value: Any, join_key: str, features: dict[str, Any]) -> None:
    """Any JSON value: refused with a code, or forwarded with only the injected key changed."""
    doc = check_parse(dumps_like_a_client(value))
    if isinstance(doc, BrokerError):
        return
    original = dict(doc)
    key = entity_key(doc, join_key)
    if not isinstance(key, BrokerError):
        assert key and len(key) <= 256 and key.isprintable()
    enriched = orjson.loads(inject_features(doc, "features", features))
    assert enriched["features"] == orjson.loads(orjson.dumps(features))
    assert {k: v for k, v in enriched.items() if k != "features"} == orjson.loads(
        orjson.dumps({k: v for k, v in original.items() if k != "features"})
    )


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=3000))
def test_deep_nesting_is_refused_past_the_limit(depth: int) -> None:
    """Nesting up to the limit parses; deeper is a 400, never a stack overflow."""
    doc = check_parse(nested(depth))
    assert isinstance(doc, BrokerError) == (depth + 1 > MAX_DEPTH)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["customer_id", "features", "amount", "x"]), scalars | st.just({"income": 1e9})),
        min_size=1,
        max_size=8,
    )
)
def test_duplicate_keys_cannot_smuggle_features(pairs: list[tuple[str, Any]]) -> None:
    """Repeated keys resolve to one value each, and the injected features replace every copy."""
    doc = check_parse(with_duplicates(pairs))
    if isinstance(doc, BrokerError):
        return
    assert doc == dict(pairs)  # NaN, Infinity and >64-bit integers were refused above
    body = inject_features(doc, "features", {"income": 1})
    assert body.count(b'"features"') == 1
    assert orjson.loads(body)["features"] == {"income": 1}


class ServerThread:
    """The broker's gRPC server on its own event loop, so hypothesis can drive it synchronously."""

    def __init__(self, processor: BrokerProcessor) -> None:
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.processor = processor
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _start(self) -> grpc.aio.Server:
        server = grpc.aio.server()
        add_service(server, self.processor)
        server.add_insecure_port(f"127.0.0.1:{self.port}")
        await server.start()
        return server

    def __enter__(self) -> ServerThread:
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def sync_stub() -> Iterator[ext_proc_grpc.ExternalProcessorStub]:
    doc = demo_registry_doc(ensembles=[])  # ensembles need an egress client; the body path is the same
    doc["limits"]["max_body_bytes"] = 2048
    registry = parse_registry(doc)
    store = CachedFeatureStore(
        EmbeddedFeatureStore.from_file(DEMO_DIR / "features.json"), ttl_seconds=1, max_entries=100, timeout_s=1
    )
    with (
        ServerThread(BrokerProcessor(registry, store)) as server,
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        yield ext_proc_grpc.ExternalProcessorStub(channel)


# Envoy sends attributes as protobuf strings: valid UTF-8, so no lone surrogates (the test client could not encode one).
header_values = st.text(alphabet=st.characters(codec="utf-8"), max_size=60) | st.sampled_from(
    ["application/json\r\nx-evil: 1", "application/json\n", "application/json; charset=\x00", "\r\n\r\n"]
)
bodies = st.one_of(
    st.binary(max_size=400),
    json_values.map(dumps_like_a_client),
    st.builds(lambda v: b'{"customer_id": "c-1", "v": ' + dumps_like_a_client(v) + b"}", json_values),
    st.integers(min_value=1, max_value=100).map(nested),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bodies, header_values | st.just("application/json"), st.sampled_from(["credit-risk", "nope", ""]))
def test_ext_proc_answers_every_body(
    sync_stub: ext_proc_grpc.ExternalProcessorStub, body: bytes, content_type: str, route: str
) -> None:
    """Through the gRPC server: an enriched JSON object, or an immediate 4xx with the error shape."""
    attrs = Struct()
    attrs.update({wire.ATTR_ROUTE_NAME: route, wire.ATTR_REQUEST_ID: "r-1", wire.ATTR_CONTENT_TYPE: content_type})
    request = ProcessingRequest(
        request_body=HttpBody(body=body, end_of_stream=True), attributes={wire.ATTRIBUTES_FILTER_KEY: attrs}
    )
    (response,) = list(sync_stub.Process(iter([request]), timeout=10))
    if response.HasField("immediate_response"):
        immediate = response.immediate_response
        assert immediate.status.code in {400, 404, 413, 415}, immediate
        error = orjson.loads(immediate.body)["error"]
        assert set(error) == {"code", "message", "request_id"} and error["request_id"] == "r-1"
    else:
        enriched = orjson.loads(response.request_body.response.body_mutation.body)
        assert isinstance(enriched, dict) and isinstance(enriched["features"], dict)


@pytest.fixture(scope="module")
def open_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The demo as shipped (open, embedded store), for raw HTTP through Envoy."""
    doc = demo_registry_doc()
    doc["broker"]["workers"] = 1
    with run_stack(doc, tmp_path_factory.mktemp("hardening")) as stack:
        yield stack


def raw_exchange(port: int, request: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 exchange on a fresh socket: (status, body), read up to content-length.

    Not until close: after a codec error Envoy answers at once but delays the close by a second.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        while length and len(body) < int(length.group(1)) and (chunk := sock.recv(65536)):
            body += chunk
    return int(head.split(b" ", 2)[1]), body


# Header values as bytes on the wire: bare CR, bare LF, NUL, obs-fold, high bytes.
wire_header_values = st.binary(max_size=40) | st.sampled_from(
    [b"a\rb", b"a\nb", b"a\x00b", b"\r\n injected: 1", b"\xff\xfe", b" spaced "]
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bodies, wire_header_values)
def test_raw_requests_through_envoy_never_5xx(open_stack: Stack, body: bytes, header: bytes) -> None:
    """Raw bytes through Envoy: 200 from the model, or a 4xx with the JSON error shape; never 5xx, never a hang."""
    request = (
        b"POST /v1/models/credit-risk/predict HTTP/1.1\r\nhost: t\r\nconnection: close\r\n"
        b"content-type: application/json\r\nx-note: " + header + b"\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    status, answer = raw_exchange(open_stack.doc["listener"]["port"], request)
    assert status == 200 or 400 <= status < 500, (status, answer)
    if status != 200:
        error = orjson.loads(answer)["error"]
        assert set(error) == {"code", "message", "request_id"}, answer
