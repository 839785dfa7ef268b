"""Both ext_proc transports in process, without Envoy: the same message gets the same answer.

Requests are built as protobufs and, for `http_service`, turned into JSON the way
Envoy does (protobuf's JSON mapping, snake_case names). HTTP answers must parse back
into a `ProcessingResponse` (as Envoy parses them), so both compare as protobuf dicts.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import grpc
import orjson
import pytest
from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HttpBody,
    HttpHeaders,
    ProcessingRequest,
    ProcessingResponse,
)
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct

from extproc import wire
from extproc.adapters.egress import EgressClient
from extproc.audit import carried
from extproc.audit.record import AuditDraft
from extproc.core.context import RequestContext
from extproc.core.features import CachedFeatureStore, EmbeddedFeatureStore
from extproc.core.messages import HttpBody as CoreBody
from extproc.core.processor import BrokerProcessor, Processor
from extproc.core.responses import Answer, Continue
from extproc.envoy.unanswered import unanswered_logs
from extproc.process.launcher import free_port
from extproc.registry import parse_registry
from extproc.transport import HttpService, add_service, read_consumer
from extproc.transport.unanswered import unanswered
from tests.conftest import DEMO_DIR, demo_registry_doc

Exchange = Callable[[ProcessingRequest], Awaitable[dict[str, Any]]]
MAX_BYTES = 1 << 16


def broker_processor() -> tuple[BrokerProcessor, EgressClient]:
    doc = demo_registry_doc()
    doc["limits"]["max_body_bytes"] = 1024
    store = CachedFeatureStore(
        EmbeddedFeatureStore.from_file(DEMO_DIR / "features.json"), ttl_seconds=1, max_entries=10, timeout_s=1
    )
    # The demo's ensemble needs an egress client; these tests never call its members.
    egress = EgressClient(f"http://127.0.0.1:{doc['egress']['port']}")
    return BrokerProcessor(parse_registry(doc), store, egress=egress), egress


def envoy_json(message: ProcessingRequest) -> bytes:
    """What Envoy POSTs: protobuf's JSON mapping with the proto's own (snake_case) field names."""
    return json_format.MessageToJson(message, preserving_proto_field_name=True).encode()


def as_dict(response: ProcessingResponse) -> dict[str, Any]:
    found: dict[str, Any] = json_format.MessageToDict(response, preserving_proto_field_name=True)
    return found


async def http_service(processor: Processor) -> tuple[HttpService, str]:
    service = HttpService(processor, path=wire.HTTP_SERVICE_PATH, max_bytes=MAX_BYTES)
    port = free_port()
    await service.listen_tcp("127.0.0.1", port)
    return service, f"http://127.0.0.1:{port}{wire.HTTP_SERVICE_PATH}"


@contextlib.asynccontextmanager
async def served(transport: str) -> AsyncIterator[Exchange]:
    """One message in, its answer out (as a protobuf dict), over `transport`."""
    processor, egress = broker_processor()
    if transport == "grpc":
        server = grpc.aio.server()
        add_service(server, processor)
        port = free_port()
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ext_proc_grpc.ExternalProcessorStub(channel)

            async def over_grpc(message: ProcessingRequest) -> dict[str, Any]:
                (response,) = [r async for r in stub.Process(iter([message]))]
                return as_dict(response)

            yield over_grpc
        await server.stop(None)
    else:
        service, url = await http_service(processor)
        async with aiohttp.ClientSession() as session:

            async def over_http(message: ProcessingRequest) -> dict[str, Any]:
                async with session.post(url, data=envoy_json(message)) as resp:
                    assert resp.status == 200, await resp.text()
                    # Envoy's parser: unknown fields or wrong types fail the message.
                    return as_dict(json_format.Parse(await resp.read(), ProcessingResponse()))

            yield over_http
        await service.drain(1.0)
    await egress.close()


@pytest.fixture(params=["grpc", "http"])
async def exchange(request: pytest.FixtureRequest) -> AsyncIterator[Exchange]:
    async with served(request.param) as ask:
        yield ask


def attributes(route: str, content_type: str = "application/json") -> dict[str, Struct]:
    values = Struct()
    values.update({wire.ATTR_ROUTE_NAME: route, wire.ATTR_REQUEST_ID: "req-1", wire.ATTR_CONTENT_TYPE: content_type})
    return {wire.ATTRIBUTES_FILTER_KEY: values}


def body_request(route: str, body: bytes, content_type: str = "application/json") -> ProcessingRequest:
    return ProcessingRequest(
        request_body=HttpBody(body=body, end_of_stream=True), attributes=attributes(route, content_type)
    )


def decoded(b64: str) -> Any:
    return orjson.loads(json_format.Parse(orjson.dumps({"body": b64}), HttpBody()).body)


async def test_body_is_enriched_with_metadata(exchange: Exchange) -> None:
    """One body message in, one body mutation out, stamped and timed for Envoy."""
    answer = await exchange(body_request("credit-risk", b'{"customer_id": "c-1", "features": 7}'))
    mutated = decoded(answer["request_body"]["response"]["body_mutation"]["body"])
    assert set(mutated["features"]) == {"income", "debt_ratio", "tenure_months", "late_payments_12m"}
    meta = answer["dynamic_metadata"][wire.METADATA_NAMESPACE]
    assert meta[wire.META_APPROVED] is True
    assert meta[wire.META_SERVER_TIMING].startswith("broker-route;dur=")


@pytest.mark.parametrize(
    ("route", "body", "content_type", "status", "code"),
    [
        ("no-such-model", b'{"customer_id": "c-1"}', "application/json", 404, "unknown_model"),
        (
            "credit-risk",
            b'{"customer_id": "c-1", "pad": "' + b"x" * 2000 + b'"}',
            "application/json",
            413,
            "body_too_large",
        ),
        ("credit-risk", b'{"customer_id": "c-1"}', "text/csv", 415, "unsupported_media_type"),
        ("credit-risk", b"{not json", "application/json", 400, "invalid_json"),
        ("", b'{"customer_id": "c-1"}', "application/json", 404, "unknown_model"),
    ],
    ids=["unknown-route", "over-limit", "csv", "not-json", "no-attributes-route"],
)
async def test_refusals_are_the_same_on_both(
    exchange: Exchange, route: str, body: bytes, content_type: str, status: int, code: str
) -> None:
    """Refusals are immediate responses with the status, JSON shape, headers and request id."""
    immediate = (await exchange(body_request(route, body, content_type)))["immediate_response"]
    assert immediate["status"]["code"] == json_format.MessageToDict(HttpStatus(code=status))["code"]
    error = decoded(immediate["body"])["error"]
    assert (error["code"], error["request_id"]) == (code, "req-1")
    assert immediate["details"] == f"model_broker_{code}"
    keys = [h["header"]["key"] for h in immediate["headers"]["set_headers"]]
    assert keys == ["content-type", wire.HEADER_SERVER_TIMING]


async def test_healthz_answers_in_the_header_phase(exchange: Exchange) -> None:
    """/healthz never reaches a body phase: the header message gets the answer."""
    request = ProcessingRequest(
        request_headers=HttpHeaders(end_of_stream=True), attributes=attributes(wire.ROUTE_HEALTHZ)
    )
    immediate = (await exchange(request))["immediate_response"]
    assert decoded(immediate["body"])["status"] == "ok"


async def test_answers_are_identical_across_transports() -> None:
    """The same request gets byte-for-byte the same answer over gRPC and http_service (timings aside)."""
    answers = []
    for transport in ("grpc", "http"):
        async with served(transport) as ask:
            for request in (
                body_request("credit-risk", b'{"customer_id": "c-2"}'),
                body_request("credit-risk", b"[]"),
                ProcessingRequest(request_headers=HttpHeaders(), attributes=attributes(wire.ROUTE_MODELS)),
            ):
                answers.append((transport, _without_timings(await ask(request))))
    assert [a for t, a in answers if t == "grpc"] == [a for t, a in answers if t == "http"]


def _without_timings(answer: dict[str, Any]) -> dict[str, Any]:
    """Stage durations differ from run to run; everything else must not."""
    answer.get("dynamic_metadata", {}).get(wire.METADATA_NAMESPACE, {}).pop(wire.META_SERVER_TIMING, None)
    headers = answer.get("immediate_response", {}).get("headers", {}).get("set_headers", [])
    answer.get("immediate_response", {})["headers"] = [h for h in headers if h["header"]["key"] != "server-timing"]
    return answer


# --- http_service only: the HTTP edge ---------------------------------------------------------


class _Held(Processor):
    """Answers a body only once released: a message still in flight when the server drains."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.finished: list[RequestContext] = []

    async def request_body(self, msg: CoreBody, ctx: RequestContext) -> Answer:
        self.started.set()
        await self.release.wait()
        return Continue(body=msg.body)

    def finish(self, ctx: RequestContext) -> None:
        self.finished.append(ctx)


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Bytes to the server, everything it sends until it closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


def post(body: bytes, path: str = wire.HTTP_SERVICE_PATH, *, close: bool = False) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nhost: broker\r\ncontent-length: {len(body)}\r\n"
    return head.encode() + (b"connection: close\r\n" if close else b"") + b"\r\n" + body


@pytest.mark.parametrize(
    ("data", "status", "reason"),
    [
        (post(b"{}", close=True), 400, "no request or response phase"),
        (post(b'{"request_trailers": {}}', close=True), 400, "trailers are not processed"),
        (post(b"[1, 2", close=True), 400, "not an ext_proc ProcessingRequest"),
        (post(b'{"request_body": {"body": "%%%"}}', close=True), 400, "not an ext_proc ProcessingRequest"),
        (post(b"{}", "/other"), 404, "POST ext_proc messages to /ext_proc"),
        (b"GET /ext_proc HTTP/1.1\r\nhost: b\r\n\r\n", 405, "POST ext_proc messages"),
        (post(b"x" * (MAX_BYTES + 1)), 413, "POST ext_proc messages"),
        (b"NOT HTTP AT ALL\r\n\r\n", 400, "malformed HTTP request"),
    ],
    ids=["no-phase", "trailers", "not-json", "bad-base64", "wrong-path", "wrong-method", "too-large", "not-http"],
)
async def test_bad_messages_get_an_http_error_envoy_fails_closed_on(data: bytes, status: int, reason: str) -> None:
    """Anything but an ext_proc message gets a 4xx JSON error (Envoy then answers 503), never a hang."""
    processor, egress = broker_processor()
    service, url = await http_service(processor)
    port = int(url.split(":")[2].split("/")[0])
    answer = await raw_exchange(port, data)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), answer
    assert reason in orjson.loads(body)["error"]
    await service.drain(1.0)
    await egress.close()


async def test_keep_alive_and_pipelined_messages_are_answered_in_order() -> None:
    """Messages on one connection get their answers in order, the connection stays open between them."""
    processor, egress = broker_processor()
    service, url = await http_service(processor)
    port = int(url.split(":")[2].split("/")[0])
    messages = [envoy_json(body_request("credit-risk", b'{"customer_id": "c-%d"}' % i)) for i in (1, 2)]
    answer = await raw_exchange(port, post(messages[0]) + post(messages[1], close=True))
    parts = answer.split(b"HTTP/1.1 200 OK\r\n")[1:]
    assert len(parts) == 2, answer
    bodies = [json_format.Parse(p.partition(b"\r\n\r\n")[2], ProcessingResponse()) for p in parts]
    ids = [orjson.loads(b.request_body.response.body_mutation.body)["customer_id"] for b in bodies]
    assert ids == ["c-1", "c-2"]
    assert b"connection: close" not in parts[0] and b"connection: close" in parts[1]
    await service.drain(1.0)
    await egress.close()


async def test_drain_answers_the_message_in_flight_then_closes() -> None:
    """On drain, idle connections close at once; a message in flight is answered (`connection: close`)."""
    processor = _Held()
    service, url = await http_service(processor)
    port = int(url.split(":")[2].split("/")[0])
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    busy = asyncio.create_task(raw_exchange(port, post(envoy_json(body_request("m", b"{}")))))
    await asyncio.wait_for(processor.started.wait(), 10)
    draining = asyncio.create_task(service.drain(10.0))
    assert await asyncio.wait_for(idle_reader.read(), 10) == b""  # closed by the server, nothing sent
    idle_writer.close()
    assert not draining.done()
    processor.release.set()
    answer = await busy
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"connection: close\r\n" in answer
    await asyncio.wait_for(draining, 10)
    assert len(processor.finished) == 1
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_trailers_are_refused_loudly_over_grpc() -> None:
    """The generated config never sends trailers; if something does, the stream fails, it does not hang."""
    async with served("grpc") as ask:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ask(ProcessingRequest(request_trailers={}))
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_consumer_is_read_from_the_auth_namespace_only() -> None:
    """The request context takes the consumer from Envoy's auth metadata, never from another namespace."""
    request = ProcessingRequest()
    request.metadata_context.filter_metadata[wire.METADATA_NAMESPACE].update({wire.META_CONSUMER: "mallory"})
    ctx = RequestContext()
    read_consumer(request.metadata_context.filter_metadata, ctx)
    assert ctx.consumer == ""
    request.metadata_context.filter_metadata[wire.AUTH_NAMESPACE].update({wire.META_CONSUMER: "alice"})
    read_consumer(request.metadata_context.filter_metadata, ctx)
    assert ctx.consumer == "alice"


def _log_entry(draft_text: str | None, route: str = "credit-risk") -> Any:
    entry = HTTPAccessLogEntry()
    entry.request.request_id = "r-1"
    entry.common_properties.route_name = route
    if draft_text is not None:
        entry.common_properties.metadata.filter_metadata[wire.METADATA_NAMESPACE].update(
            {wire.META_AUDIT_DRAFT: draft_text}
        )
    return entry


def test_an_unanswered_entry_becomes_the_context_of_a_status_null_record() -> None:
    draft = AuditDraft("credit-risk", 1764000000.0, input={"customer_id": "c-1"}, entity_key="c-1")
    ctx = unanswered(_log_entry(carried.pack(draft, [("body", 0.001)], 1764000000.1)))
    assert isinstance(ctx, RequestContext)
    assert (ctx.request_id, ctx.route_name, ctx.audit, ctx.stages) == ("r-1", "credit-risk", draft, [("body", 0.001)])


def test_an_unanswered_oip_version_route_is_recorded_as_its_model() -> None:
    draft = AuditDraft("iris", 1764000000.0)
    ctx = unanswered(_log_entry(carried.pack(draft, [], 1764000000.1), route="oip-infer:iris/v2"))
    assert isinstance(ctx, RequestContext) and ctx.route_name == "iris"


@pytest.mark.parametrize("text", [None, "", "{not json"])
def test_an_unanswered_entry_without_a_draft_says_why(text: str | None) -> None:
    assert isinstance(unanswered(_log_entry(text)), str)


@pytest.mark.parametrize(
    ("transport", "audit", "logged"), [("http", True, True), ("grpc", True, False), ("http", False, False)]
)
def test_the_unanswered_log_exists_where_drafts_travel(transport: str, audit: bool, logged: bool) -> None:
    doc = demo_registry_doc()
    doc["broker"]["transport"] = transport
    if not audit:
        del doc["audit"]
    assert bool(unanswered_logs(parse_registry(doc), dynamic=False)) is logged
