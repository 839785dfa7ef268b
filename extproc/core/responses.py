"""Pure builders of ext_proc `ProcessingResponse` messages.

Nothing here looks at a request: the processor decides, these only build.
"""

from __future__ import annotations

from typing import Any

import orjson
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    BodyMutation,
    BodyResponse,
    CommonResponse,
    HeaderMutation,
    HeadersResponse,
    ImmediateResponse,
    ProcessingResponse,
)
from envoy.type.v3.http_status_pb2 import HttpStatus

from extproc import wire
from extproc.errors import BrokerError

# Envoy's response-code details for broker answers; visible in access logs only.
DETAILS_PREFIX = "model_broker_"


def _headers(pairs: list[tuple[str, str]]) -> HeaderMutation:
    return HeaderMutation(
        set_headers=[HeaderValueOption(header=HeaderValue(key=k, raw_value=v.encode())) for k, v in pairs]
    )


def continue_request_body(body: bytes | None, metadata: dict[str, Any] | None) -> ProcessingResponse:
    """Let the request go on, with the body replaced when `body` is given."""
    common = CommonResponse(body_mutation=BodyMutation(body=body)) if body is not None else CommonResponse()
    response = ProcessingResponse(request_body=BodyResponse(response=common))
    if metadata:
        response.dynamic_metadata.update({wire.METADATA_NAMESPACE: metadata})
    return response


def reroute_request_body(body: bytes, metadata: dict[str, Any], headers: list[tuple[str, str]]) -> ProcessingResponse:
    """Replace the body, set headers Envoy routes on, and have Envoy pick the cluster again.

    Only for routes that also asked for the header phase (Envoy ignores header mutations
    from the body phase otherwise). With the header phase on, Envoy 1.40 forwards the
    client's content-length unchanged (the model then sees a truncated or hanging body:
    503), so the new length is set here. `clear_route_cache` is what the API asks for
    after a mutation that routing reads; Envoy 1.40 picked the hashed version without it
    in our tests, but that is not a documented guarantee.
    """
    pairs = [*headers, ("content-length", str(len(body)))]
    common = CommonResponse(
        header_mutation=_headers(pairs), body_mutation=BodyMutation(body=body), clear_route_cache=True
    )
    response = ProcessingResponse(request_body=BodyResponse(response=common))
    response.dynamic_metadata.update({wire.METADATA_NAMESPACE: metadata})
    return response


def continue_request_headers() -> ProcessingResponse:
    return ProcessingResponse(request_headers=HeadersResponse(response=CommonResponse()))


def continue_response_headers() -> ProcessingResponse:
    return ProcessingResponse(response_headers=HeadersResponse(response=CommonResponse()))


def continue_response_body() -> ProcessingResponse:
    return ProcessingResponse(response_body=BodyResponse(response=CommonResponse()))


def immediate_json(
    status: int, payload: Any, *, details: str, headers: list[tuple[str, str]] | None = None
) -> ProcessingResponse:
    """Answer the client directly; the request goes no further."""
    pairs = [("content-type", "application/json"), *(headers or [])]
    return ProcessingResponse(
        immediate_response=ImmediateResponse(
            status=HttpStatus(code=status),
            headers=_headers(pairs),
            body=orjson.dumps(payload),
            details=DETAILS_PREFIX + details,
        )
    )


def error_response(
    error: BrokerError, request_id: str, headers: list[tuple[str, str]] | None = None
) -> ProcessingResponse:
    return immediate_json(error.status, error.to_json(request_id), details=error.code.value, headers=headers)
