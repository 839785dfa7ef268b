"""Envoy's `http_service` messages: a JSON `ProcessingRequest` in, a JSON `ProcessingResponse` out.

Envoy writes the request with protobuf's JSON mapping (snake_case field names,
bytes in base64, every field present) and reads the answer the same way.
"""

from __future__ import annotations

import binascii
import dataclasses
import logging
import time
from typing import Any

import orjson

from extproc import wire
from extproc.audit import carried
from extproc.core.context import RequestContext
from extproc.core.messages import HttpBody, HttpHeaders
from extproc.core.responses import Answer, Continue, HeaderPairs
from extproc.transport.request_info import read_attributes, read_consumer

log = logging.getLogger("model_broker.http_service")

BODY_PHASES = ("request_body", "response_body")
HEADER_PHASES = ("request_headers", "response_headers")

Message = HttpHeaders | HttpBody


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _bytes(b64: str) -> bytes:
    """Envoy writes standard base64; anything else is not its message."""
    return binascii.a2b_base64(b64, strict_mode=True)


def _phase(request: dict[str, Any]) -> tuple[str, Message] | str:
    for phase in BODY_PHASES:
        if (msg := request.get(phase)) is not None:
            return phase, HttpBody(_bytes(msg.get("body", "")), bool(msg.get("end_of_stream", True)))
    for phase in HEADER_PHASES:
        if (msg := request.get(phase)) is not None:
            headers = msg.get("headers", {}).get("headers", [])
            pairs = {h["key"]: _bytes(h.get("raw_value", "")).decode("latin-1") for h in headers}
            return phase, HttpHeaders(pairs, bool(msg.get("end_of_stream", False)))
    return "no request or response phase in the message (trailers are not processed)"


def decode(raw: bytes, ctx: RequestContext) -> tuple[str, Message] | str:
    """The phase and its message (attributes and consumer go to `ctx`), or why it is not one."""
    try:
        request = orjson.loads(raw)
        attrs = request.get("attributes", {}).get(wire.ATTRIBUTES_FILTER_KEY)
        if attrs is not None:
            read_attributes(attrs, ctx)
        filter_metadata = request.get("metadata_context", {}).get("filter_metadata", {})
        read_consumer(filter_metadata, ctx)
        _read_draft(filter_metadata.get(wire.METADATA_NAMESPACE), ctx)
        return _phase(request)
    except (orjson.JSONDecodeError, AttributeError, TypeError, KeyError, ValueError, binascii.Error) as exc:
        return f"not an ext_proc ProcessingRequest: {exc!r}"


def _read_draft(broker: dict[str, Any] | None, ctx: RequestContext) -> None:
    """The response phase of an audited route: its request phase's draft, as Envoy carried it."""
    if broker is None or wire.META_AUDIT_DRAFT not in broker:
        return
    found = carried.unpack(broker[wire.META_AUDIT_DRAFT])
    if isinstance(found, str):
        # Still recorded, from what this call says (route, id, status, body), never lost.
        log.error("request %s: %s", ctx.request_id or "?", found)
        return
    ctx.audit = found.draft
    ctx.resume(found.stages, time.time() - found.answered_at)


def carry_draft(phase: str, answer: Answer, ctx: RequestContext) -> Answer:
    """A request phase that opened an audit draft lets Envoy carry it to the response phase;
    the response phase, once its record is written, clears it.

    The request phase's context lets go of the draft, so this call's end writes no "no
    response seen" record; a draft never cleared is Envoy's to report (`envoy.unanswered`).
    """
    if not isinstance(answer, Continue):
        return answer
    if phase == "response_body":
        value = ""
    elif ctx.audit is not None and not ctx.audit.written:
        value = carried.pack(ctx.audit, ctx.stages, time.time())
        ctx.audit = None
    else:
        return answer
    return dataclasses.replace(answer, metadata={**(answer.metadata or {}), wire.META_AUDIT_DRAFT: value})


def _headers(pairs: HeaderPairs) -> dict[str, Any]:
    return {"set_headers": [{"header": {"key": k, "raw_value": _b64(v.encode())}} for k, v in pairs]}


def encode(phase: str, answer: Answer) -> bytes:
    """`answer` to the message of `phase`, as Envoy's JSON `ProcessingResponse`."""
    if not isinstance(answer, Continue):
        immediate = {
            "status": {"code": answer.status},
            "headers": _headers(answer.headers),
            "body": _b64(answer.body),
            "details": answer.details,
        }
        return orjson.dumps({"immediate_response": immediate})
    common: dict[str, Any] = {}
    if answer.body is not None:
        common["body_mutation"] = {"body": _b64(answer.body)}
    if answer.headers or answer.clear_route_cache:
        # Envoy clears its route cache only for an answer carrying a header mutation (see grpc_answers).
        common["header_mutation"] = _headers(answer.headers)
    if answer.clear_route_cache:
        common["clear_route_cache"] = True
    response: dict[str, Any] = {phase: {"response": common}}
    if answer.metadata:
        response["dynamic_metadata"] = {wire.METADATA_NAMESPACE: answer.metadata}
    return orjson.dumps(response)
