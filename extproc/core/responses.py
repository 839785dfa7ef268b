"""Pure builders of the broker's answers to Envoy, free of any protocol.

Nothing here looks at a request: the processor decides, these only build. A
transport encodes an answer for the phase it was asked in (gRPC protobuf or the
`http_service` JSON), so the phase is not part of the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from extproc.errors import BrokerError

# Envoy's response-code details for broker answers; visible in access logs only.
DETAILS_PREFIX = "model_broker_"

HeaderPairs = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Continue:
    """Let the request (or response) go on; with its body replaced, headers set, metadata emitted."""

    body: bytes | None = None
    headers: HeaderPairs = ()
    metadata: dict[str, Any] | None = None
    # Envoy picks the route and cluster again: after a mutation that routing reads.
    clear_route_cache: bool = False


@dataclass(frozen=True, slots=True)
class Immediate:
    """Answer the client directly; the request goes no further."""

    status: int
    body: bytes
    headers: HeaderPairs
    # Envoy's response-code details (access logs; local-reply mappers leave these alone).
    details: str


Answer = Continue | Immediate

# The answer of a phase the broker only lets through.
CONTINUE = Continue()


def continue_request_body(body: bytes | None, metadata: dict[str, Any] | None, *, reroute: bool = False) -> Continue:
    """Let the request go on, with the body replaced when `body` is given.

    `reroute`: Envoy matches the route again, now seeing the metadata (a rule's pinned version is
    a route matching `model_broker.pin`). The header phase stays skipped, so the request keeps to
    one ext_proc message (measured with Envoy 1.40).
    """
    return Continue(body=body, metadata=metadata or None, clear_route_cache=reroute)


def reroute_request_body(body: bytes, metadata: dict[str, Any], headers: list[tuple[str, str]]) -> Continue:
    """Replace the body, set headers Envoy routes on, and have Envoy pick the cluster again.

    Only for routes that also asked for the header phase (Envoy ignores header mutations
    from the body phase otherwise). With the header phase on, Envoy 1.40 forwards the
    client's content-length unchanged (the model then sees a truncated or hanging body:
    503), so the new length is set here. `clear_route_cache` is what the API asks for
    after a mutation that routing reads; Envoy 1.40 picked the hashed version without it
    in our tests, but that is not a documented guarantee.
    """
    pairs = (*headers, ("content-length", str(len(body))))
    return Continue(body=body, headers=pairs, metadata=metadata, clear_route_cache=True)


def continue_request_headers() -> Continue:
    return CONTINUE


def continue_response_headers() -> Continue:
    return CONTINUE


def continue_response_body() -> Continue:
    return CONTINUE


def immediate_json(
    status: int, payload: Any, *, details: str, headers: list[tuple[str, str]] | None = None
) -> Immediate:
    """Answer the client directly with JSON."""
    pairs = (("content-type", "application/json"), *(headers or ()))
    return Immediate(status, orjson.dumps(payload), pairs, DETAILS_PREFIX + details)


def error_response(error: BrokerError, request_id: str, headers: list[tuple[str, str]] | None = None) -> Immediate:
    return immediate_json(error.status, error.to_json(request_id), details=error.code.value, headers=headers)
