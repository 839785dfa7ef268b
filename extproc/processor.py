"""What the broker does with each ext_proc message.

`Processor` answers every message with a pass-through, so the stream loop never
asks "is there a handler?"; `BrokerProcessor` overrides the phases it uses.
"""

from __future__ import annotations

from typing import Any

import orjson
from envoy.service.ext_proc.v3.external_processor_pb2 import HttpBody, HttpHeaders, ProcessingResponse

from extproc import metrics, responses, wire
from extproc.audit import AuditDraft, AuditTrail, error_body, sha256
from extproc.body import check_content_type, entity_key, inject_features, parse_json_object
from extproc.context import RequestContext
from extproc.errors import BrokerError, ErrorCode, FeatureStoreUnavailable
from extproc.features import Features, FeatureStore
from extproc.registry import Registry
from extproc.routing import ModelRoute, compile_routes, describe_models, resolve_route


class Processor:
    """Pass-through for every phase; subclasses override what they need."""

    async def request_headers(self, msg: HttpHeaders, ctx: RequestContext) -> ProcessingResponse:
        return responses.continue_request_headers()

    async def request_body(self, msg: HttpBody, ctx: RequestContext) -> ProcessingResponse:
        return responses.continue_request_body(None, None)

    async def response_headers(self, msg: HttpHeaders, ctx: RequestContext) -> ProcessingResponse:
        return responses.continue_response_headers()

    async def response_body(self, msg: HttpBody, ctx: RequestContext) -> ProcessingResponse:
        return responses.continue_response_body()

    def finish(self, ctx: RequestContext) -> None:
        """Once per stream, after its last message (or its cancellation)."""


# Refusal when the audit spool is full and the policy is fail-closed.
AUDIT_FULL = BrokerError(ErrorCode.AUDIT_UNAVAILABLE, "the audit trail cannot record this request; try again shortly")


class BrokerProcessor(Processor):
    def __init__(self, registry: Registry, store: FeatureStore, audit: AuditTrail | None = None) -> None:
        self._registry = registry
        self._audit = audit
        self._routes = compile_routes(registry)
        self._store = store
        self._max_body = registry.limits.max_body_bytes
        self._max_depth = registry.limits.max_json_depth
        # Built once: the registry does not change under a running worker.
        self._models_doc = orjson.dumps(describe_models(registry))
        self._health_doc = {"status": "ok", "registry_version": registry.registry_version}

    async def request_headers(self, msg: HttpHeaders, ctx: RequestContext) -> ProcessingResponse:
        """Only the broker's own GET routes ask for the header phase."""
        if ctx.route_name == wire.ROUTE_HEALTHZ:
            ctx.finished = True
            return responses.immediate_json(200, self._health_doc, details="healthz")
        if ctx.route_name == wire.ROUTE_MODELS:
            ctx.finished = True
            return responses.immediate_json(200, orjson.Fragment(self._models_doc), details="models")
        return responses.continue_request_headers()

    async def request_body(self, msg: HttpBody, ctx: RequestContext) -> ProcessingResponse:
        route = resolve_route(self._routes, ctx.route_name)
        if isinstance(route, BrokerError):
            return self._reject(route, ctx)
        if self._audit is not None and self._audit.covers(route.model):
            if self._audit.refuses():  # nothing runs that cannot be audited
                return self._reject(AUDIT_FULL, ctx)
            ctx.audit = AuditDraft(route.model, ctx.started_at, request_sha256=sha256(msg.body))
        doc = self._parse(msg.body, route, ctx)
        if isinstance(doc, BrokerError):
            return self._reject(doc, ctx)
        key = entity_key(doc, route.join_key)
        if ctx.audit is not None:
            # A shallow copy: injection replaces one top-level key of `doc`.
            ctx.audit.input, ctx.audit.entity_key = dict(doc), key if isinstance(key, str) else None
        if isinstance(key, BrokerError):
            return self._reject(key, ctx)
        ctx.lap("route")
        features, degraded = await self._features(route, key)
        ctx.lap("features")
        if ctx.audit is not None and not isinstance(features, BrokerError):
            ctx.audit.features, ctx.audit.feature_status = features, degraded or "ok"
        if isinstance(features, BrokerError):
            return self._reject(features, ctx)
        body = inject_features(doc, route.inject_as, features)
        ctx.lap("body")
        metadata: dict[str, Any] = {wire.META_APPROVED: True, wire.META_SERVER_TIMING: ctx.server_timing()}
        if degraded:
            metadata[wire.META_DEGRADED] = degraded
        metrics.record_request(route.model, ctx.stages, degraded or "ok")
        # Model routes ask for the request body only; audited ones also send the response.
        ctx.finished = ctx.audit is None
        return responses.continue_request_body(body, metadata)

    def _parse(self, raw: bytes, route: ModelRoute, ctx: RequestContext) -> dict[str, Any] | BrokerError:
        unsupported = check_content_type(ctx.content_type)
        if unsupported is not None:
            return unsupported
        if len(raw) > self._max_body:
            return BrokerError(ErrorCode.BODY_TOO_LARGE, f"the request body is larger than {self._max_body} bytes")
        return parse_json_object(raw, self._max_depth)

    async def _features(self, route: ModelRoute, key: str) -> tuple[Features | BrokerError, str]:
        """The features to inject, and why they are missing when a policy let that pass."""
        try:
            found = await self._store.fetch(route.store_key(key), route.features)
        except FeatureStoreUnavailable as exc:
            if route.fail_open:  # declared fail-open: the model copes without features
                return {}, "feature_store_unavailable"
            return BrokerError(ErrorCode.FEATURE_STORE_UNAVAILABLE, f"the feature store is unavailable ({exc})"), ""
        if found is None:
            if route.forward_unknown_entity:
                return {}, "unknown_entity"
            return BrokerError(ErrorCode.UNKNOWN_ENTITY, f"no features are stored for {route.join_key} '{key}'"), ""
        return found, ""

    def _reject(self, error: BrokerError, ctx: RequestContext) -> ProcessingResponse:
        ctx.lap("reject")
        ctx.finished = True
        metrics.record_request(ctx.route_name, ctx.stages, error.code.value)
        if ctx.audit is not None:
            ctx.audit.error_code = error.code.value
            if not self._write_audit(ctx, error.status, error_body(error, ctx.request_id)):
                error = AUDIT_FULL
        return responses.error_response(
            error, ctx.request_id, headers=[(wire.HEADER_SERVER_TIMING, ctx.server_timing())]
        )

    async def response_headers(self, msg: HttpHeaders, ctx: RequestContext) -> ProcessingResponse:
        """Audited routes only: Envoy holds these headers until the body phase is answered."""
        ctx.lap("upstream")
        if ctx.audit is None and self._audit is not None and self._audit.covers(ctx.route_name):
            # Envoy refused the request before any body phase (it had no body): audit that answer too.
            ctx.audit = AuditDraft(ctx.route_name, ctx.started_at)
        return responses.continue_response_headers()

    async def response_body(self, msg: HttpBody, ctx: RequestContext) -> ProcessingResponse:
        """The record reaches the spool before the response is released to the client."""
        ctx.finished = True  # the last phase any route asks for
        if ctx.audit is None or ctx.audit.written:
            return responses.continue_response_body()
        if not self._write_audit(ctx, ctx.response_status, msg.body):
            return responses.error_response(AUDIT_FULL, ctx.request_id)
        return responses.continue_response_body()

    def finish(self, ctx: RequestContext) -> None:
        """An audited request whose response the broker never saw still gets a record (status null)."""
        if ctx.audit is not None and not ctx.audit.written:
            self._write_audit(ctx, None, b"")

    def _write_audit(self, ctx: RequestContext, status: int | None, body: bytes) -> bool:
        # Only called for audited requests, which exist only when a trail does.
        assert self._audit is not None
        assert ctx.audit is not None
        return self._audit.write(
            ctx.audit,
            request_id=ctx.request_id,
            route=ctx.route_name,
            version=ctx.version,
            stages=ctx.stages,
            status=status,
            body=body,
        )
