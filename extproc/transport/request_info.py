"""What Envoy says about a request besides the phase message: its attributes and consumer.

Both transports read them the same way: a protobuf `Struct` (gRPC) and a JSON
object (`http_service`) both answer `in` and `[]` with plain values.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from extproc import wire
from extproc.core.context import RequestContext


class Fields(Protocol):
    """A `google.protobuf.Struct` or a dict decoded from JSON."""

    def __contains__(self, key: object, /) -> bool: ...
    def __getitem__(self, key: str, /) -> Any: ...
    def __iter__(self) -> Iterator[str]: ...


def read_attributes(attrs: Fields, ctx: RequestContext) -> None:
    """Envoy sends the attributes with the first message of each direction."""
    if wire.ATTR_RESPONSE_CODE in attrs:
        read_response_attributes(attrs, ctx)
        return
    ctx.route_name = str(attrs[wire.ATTR_ROUTE_NAME]) if wire.ATTR_ROUTE_NAME in attrs else ""
    ctx.request_id = str(attrs[wire.ATTR_REQUEST_ID]) if wire.ATTR_REQUEST_ID in attrs else ""
    ctx.content_type = str(attrs[wire.ATTR_CONTENT_TYPE]) if wire.ATTR_CONTENT_TYPE in attrs else ""
    # Headers an OIP model takes its entity key from; Envoy sends none the request lacks.
    for name in attrs:
        if name.startswith(wire.ATTR_HEADER_PREFIX) and name != wire.ATTR_CONTENT_TYPE:
            ctx.headers[name[len(wire.ATTR_HEADER_PREFIX) : -2]] = str(attrs[name])


def read_response_attributes(attrs: Fields, ctx: RequestContext) -> None:
    """Status and serving version; route and id too, for responses whose request the broker never saw."""
    ctx.response_status = int(attrs[wire.ATTR_RESPONSE_CODE])
    if wire.ATTR_UPSTREAM_VERSION in attrs:
        ctx.version = str(attrs[wire.ATTR_UPSTREAM_VERSION])
    if not ctx.route_name and wire.ATTR_ROUTE_NAME in attrs:
        ctx.route_name = str(attrs[wire.ATTR_ROUTE_NAME])
    if not ctx.request_id and wire.ATTR_REQUEST_ID in attrs:
        ctx.request_id = str(attrs[wire.ATTR_REQUEST_ID])


def read_consumer(filter_metadata: Mapping[str, Fields], ctx: RequestContext) -> None:
    """The consumer Envoy's authentication filter verified, forwarded as metadata clients cannot write.

    Only from `wire.AUTH_NAMESPACE`: the broker's own namespace is not proof of anything.
    """
    auth = filter_metadata.get(wire.AUTH_NAMESPACE)
    if auth is not None and wire.META_CONSUMER in auth:
        ctx.consumer = str(auth[wire.META_CONSUMER])
