"""The broker's answers as ext_proc `ProcessingResponse` protobufs, for the phase they answer."""

from __future__ import annotations

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
from extproc.core.responses import Answer, Continue, HeaderPairs

# ext_proc phases whose answer carries a `HeadersResponse`; the others carry a `BodyResponse`.
HEADER_PHASES = frozenset({"request_headers", "response_headers"})


def _headers(pairs: HeaderPairs) -> HeaderMutation:
    return HeaderMutation(
        set_headers=[HeaderValueOption(header=HeaderValue(key=k, raw_value=v.encode())) for k, v in pairs]
    )


def _common(answer: Continue) -> CommonResponse:
    common = CommonResponse(clear_route_cache=answer.clear_route_cache)
    if answer.body is not None:
        common.body_mutation.CopyFrom(BodyMutation(body=answer.body))
    if answer.headers or answer.clear_route_cache:
        # Envoy 1.40 clears its route cache only for an answer that carries a header mutation,
        # even one it cannot apply (a body-phase answer with the header phase skipped): an empty
        # mutation is enough to have a rule's pinned route matched again (measured).
        common.header_mutation.CopyFrom(_headers(answer.headers))
    return common


def encode(phase: str, answer: Answer) -> ProcessingResponse:
    """`answer` to the message of `phase` (a `ProcessingRequest` oneof name)."""
    if not isinstance(answer, Continue):
        return ProcessingResponse(
            immediate_response=ImmediateResponse(
                status=HttpStatus(code=answer.status),
                headers=_headers(answer.headers),
                body=answer.body,
                details=answer.details,
            )
        )
    if phase in HEADER_PHASES:
        response = ProcessingResponse(**{phase: HeadersResponse(response=_common(answer))})
    else:
        response = ProcessingResponse(**{phase: BodyResponse(response=_common(answer))})
    if answer.metadata:
        response.dynamic_metadata.update({wire.METADATA_NAMESPACE: answer.metadata})
    return response
