"""The control plane's doors besides RTDS: the admin HTTP API (weights) and Envoy's OTLP stats export.

Thin edges over `ControlPlane`: the bearer token, JSON in and out, protobufs in.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import orjson
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

from extproc.errors import BrokerError, ErrorCode

if TYPE_CHECKING:
    from extproc.rollout.control_plane import ControlPlane

METRICS_SERVICE = "opentelemetry.proto.collector.metrics.v1.MetricsService"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(error: BrokerError) -> web.Response:
    body = error.to_json(request_id="")
    return web.Response(status=error.status, body=orjson.dumps(body), content_type="application/json")


def _json(doc: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json")


def admin_app(plane: ControlPlane, token: str) -> web.Application:
    """`GET /weights`, `PUT /weights/{model}`; everything but `/healthz` needs the bearer token."""

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != "/healthz":
            given = request.headers.get("authorization", "").removeprefix("Bearer ").encode()
            if not hmac.compare_digest(given, token.encode()):
                return _error(BrokerError(ErrorCode.ADMIN_UNAUTHORIZED, "send 'Authorization: Bearer <admin token>'"))
        return await handler(request)

    async def healthz(_: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def get_weights(_: web.Request) -> web.Response:
        return _json(plane.describe())

    async def put_weights(request: web.Request) -> web.Response:
        try:
            doc = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            return _error(BrokerError(ErrorCode.INVALID_WEIGHTS, f"the body is not JSON: {exc}"))
        weights = doc.get("weights") if isinstance(doc, dict) else None
        if not isinstance(weights, dict):
            return _error(BrokerError(ErrorCode.INVALID_WEIGHTS, 'send {"weights": {"<version>": <weight>, ...}}'))
        result = await plane.set_weights(request.match_info["model"], weights, source="admin")
        return _error(result) if isinstance(result, BrokerError) else _json(result)

    app = web.Application(middlewares=[authenticate])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/weights", get_weights)
    app.router.add_put("/weights/{model}", put_weights)
    return app


def add_metrics_service(server: grpc.aio.Server, plane: ControlPlane) -> None:
    """OTLP metrics export (Envoy's OpenTelemetry stat sink); xds-protos ships the messages, not the stub."""

    async def export(request: ExportMetricsServiceRequest, _: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await plane.observe(request)
        return ExportMetricsServiceResponse()

    method = grpc.unary_unary_rpc_method_handler(
        export,
        request_deserializer=ExportMetricsServiceRequest.FromString,
        response_serializer=ExportMetricsServiceResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(METRICS_SERVICE, {"Export": method}),))
