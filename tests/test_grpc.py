"""A real ext_proc gRPC client against the broker's server, in process, without Envoy."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HttpBody,
    HttpHeaders,
    ProcessingRequest,
    ProcessingResponse,
)
from google.protobuf.struct_pb2 import Struct

from extproc import wire
from extproc.adapters.egress import EgressClient
from extproc.core.context import RequestContext
from extproc.core.features import CachedFeatureStore, EmbeddedFeatureStore
from extproc.core.processor import BrokerProcessor
from extproc.process.launcher import free_port
from extproc.registry import parse_registry
from extproc.transport import add_service, read_consumer
from tests.conftest import DEMO_DIR, demo_registry_doc


@pytest.fixture
async def stub() -> AsyncIterator[ext_proc_grpc.ExternalProcessorStub]:
    doc = demo_registry_doc()
    doc["limits"]["max_body_bytes"] = 1024
    registry = parse_registry(doc)
    store = CachedFeatureStore(
        EmbeddedFeatureStore.from_file(DEMO_DIR / "features.json"), ttl_seconds=1, max_entries=10, timeout_s=1
    )
    server = grpc.aio.server()
    # The demo's ensemble needs an egress client; these tests never call its members.
    egress = EgressClient(f"http://127.0.0.1:{doc['egress']['port']}")
    add_service(server, BrokerProcessor(registry, store, egress=egress))
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield ext_proc_grpc.ExternalProcessorStub(channel)
    await server.stop(None)
    await egress.close()


def attributes(route: str, content_type: str = "application/json") -> dict[str, Struct]:
    values = Struct()
    values.update({wire.ATTR_ROUTE_NAME: route, wire.ATTR_REQUEST_ID: "req-1", wire.ATTR_CONTENT_TYPE: content_type})
    return {wire.ATTRIBUTES_FILTER_KEY: values}


async def exchange(stub: ext_proc_grpc.ExternalProcessorStub, *requests: ProcessingRequest) -> list[ProcessingResponse]:
    return [r async for r in stub.Process(iter(requests))]


def body_request(route: str, body: bytes, content_type: str = "application/json") -> ProcessingRequest:
    return ProcessingRequest(
        request_body=HttpBody(body=body, end_of_stream=True), attributes=attributes(route, content_type)
    )


async def test_body_is_enriched_with_metadata(stub: ext_proc_grpc.ExternalProcessorStub) -> None:
    """One body message in, one body mutation out, stamped and timed for Envoy."""
    (response,) = await exchange(stub, body_request("credit-risk", b'{"customer_id": "c-1", "features": 7}'))
    mutated = orjson.loads(response.request_body.response.body_mutation.body)
    assert set(mutated["features"]) == {"income", "debt_ratio", "tenure_months", "late_payments_12m"}
    meta = response.dynamic_metadata.fields[wire.METADATA_NAMESPACE].struct_value.fields
    assert meta[wire.META_APPROVED].bool_value is True
    assert meta[wire.META_SERVER_TIMING].string_value.startswith("broker-route;dur=")


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
        ("", b'{"customer_id": "c-1"}', "application/json", 404, "unknown_model"),
    ],
    ids=["unknown-route", "over-limit", "csv", "no-attributes-route"],
)
async def test_immediate_errors(
    stub: ext_proc_grpc.ExternalProcessorStub, route: str, body: bytes, content_type: str, status: int, code: str
) -> None:
    """Refusals are immediate responses with the status, JSON shape and request id."""
    (response,) = await exchange(stub, body_request(route, body, content_type))
    immediate = response.immediate_response
    assert immediate.status.code == status
    assert orjson.loads(immediate.body)["error"] == {
        "code": code,
        "message": orjson.loads(immediate.body)["error"]["message"],
        "request_id": "req-1",
    }
    assert immediate.details == f"model_broker_{code}"


async def test_healthz_answers_in_the_header_phase(stub: ext_proc_grpc.ExternalProcessorStub) -> None:
    """/healthz never reaches a body phase: the header message gets the answer."""
    request = ProcessingRequest(
        request_headers=HttpHeaders(end_of_stream=True), attributes=attributes(wire.ROUTE_HEALTHZ)
    )
    (response,) = await exchange(stub, request)
    assert response.immediate_response.status.code == 200
    assert orjson.loads(response.immediate_response.body)["status"] == "ok"


async def test_trailers_are_refused_loudly(stub: ext_proc_grpc.ExternalProcessorStub) -> None:
    """The generated config never sends trailers; if something does, the stream fails, it does not hang."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await exchange(stub, ProcessingRequest(request_trailers={}))
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
