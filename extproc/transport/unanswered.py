"""Envoy's access-log stream of audited requests whose response phase never came (`envoy.unanswered`).

Each entry carries the request's audit draft, as Envoy kept it in its dynamic metadata;
the broker writes the record with status null, exactly as a gRPC stream's end does.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from extproc import wire
from extproc.audit import carried
from extproc.core.context import RequestContext
from extproc.core.processor import Processor

log = logging.getLogger("model_broker.unanswered")


def unanswered(entry: Any) -> RequestContext | str:
    """The context `Processor.finish` records a never-answered execution from, or why the entry has none."""
    broker = entry.common_properties.metadata.filter_metadata.get(wire.METADATA_NAMESPACE)
    text = broker.fields[wire.META_AUDIT_DRAFT].string_value if broker is not None else ""
    found = carried.unpack(text)
    if isinstance(found, str):
        return found
    route = entry.common_properties.route_name
    # An OIP version's own route is recorded as its model's, as the request phase names it.
    return RequestContext(
        request_id=entry.request.request_id,
        route_name=wire.oip_route_model(route) or route,
        audit=found.draft,
        stages=found.stages,
    )


class UnansweredService(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]  # generated, untyped
    def __init__(self, processor: Processor) -> None:
        self._finish = processor.finish

    async def StreamAccessLogs(  # noqa: N802  (the gRPC method name is fixed by the proto)
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> als_pb2.StreamAccessLogsResponse:
        async for message in request_iterator:
            if message.identifier.log_name and message.identifier.log_name != wire.UNANSWERED_LOG:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown log {message.identifier.log_name!r}")
            for entry in message.http_logs.log_entry:
                ctx = unanswered(entry)
                if isinstance(ctx, str):
                    log.error("unanswered request %s: %s", entry.request.request_id or "?", ctx)
                    continue
                self._finish(ctx)
        return als_pb2.StreamAccessLogsResponse()


def add_unanswered_service(server: grpc.aio.Server, processor: Processor) -> None:
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(UnansweredService(processor), server)
