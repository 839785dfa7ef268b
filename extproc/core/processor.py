"""What the broker does with each ext_proc message.

`Processor` answers every message with a pass-through, so the stream loop never
asks "is there a handler?"; `BrokerProcessor` overrides the phases it uses: it admits,
opens and closes the audit record and answers refusals, while the body phases live in
`json_body` (JSON model routes), `oip_body` and `ensemble/body`, with `forward` their common last step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from importlib.metadata import version as package_version
from typing import Any, Protocol

import orjson

from extproc import metrics, wire
from extproc.audit.record import AuditDraft, AuditTrail, error_body, sha256
from extproc.core import responses
from extproc.core.admission import AUDIT_FULL, OVERLOADED, Admission
from extproc.core.context import RequestContext
from extproc.core.ensemble.body import answer_ensemble
from extproc.core.ensemble.fanout import MemberClient, compile_ensembles
from extproc.core.features import FeatureStore
from extproc.core.forward import forward_to_split
from extproc.core.json_body import forward_json_request
from extproc.core.messages import HttpBody, HttpHeaders
from extproc.core.oip import BackendReader, ModelEndpoint, OipPlan, compile_endpoints, error_json, server_metadata
from extproc.core.oip import answer as oip_answer
from extproc.core.oip_body import enrich_infer_request
from extproc.core.responses import Answer
from extproc.core.routing import (
    ModelRoute,
    compile_routes,
    describe_models,
    named_version_routes,
    resolve_route,
    with_ground_truth,
)
from extproc.errors import BrokerError
from extproc.registry import Registry


class Processor:
    """Pass-through for every phase; subclasses override what they need."""

    async def request_headers(self, msg: HttpHeaders, ctx: RequestContext) -> Answer:
        return responses.continue_request_headers()

    async def request_body(self, msg: HttpBody, ctx: RequestContext) -> Answer:
        return responses.continue_request_body(None, None)

    async def response_headers(self, msg: HttpHeaders, ctx: RequestContext) -> Answer:
        return responses.continue_response_headers()

    async def response_body(self, msg: HttpBody, ctx: RequestContext) -> Answer:
        return responses.continue_response_body()

    def finish(self, ctx: RequestContext) -> None:
        """Once per stream, after its last message (or its cancellation)."""


class Egress(MemberClient, BackendReader, Protocol):
    """Envoy's egress listener: ensemble members (POST) and OIP backends' metadata and readiness (GET)."""


class BrokerProcessor(Processor):
    def __init__(
        self,
        registry: Registry,
        store: FeatureStore,
        *,
        egress: Egress | None = None,
        audit: AuditTrail | None = None,
        ground_truth: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self._store = store
        # Labels per model and version (the control plane's summary), for `GET /models`.
        self._ground_truth = ground_truth
        self._egress = egress
        self._audit = audit
        # The broker section is fixed until a restart, so a reload never resets the count.
        self._admission = Admission(registry.broker.max_in_flight)
        self._retry_after = str(registry.overload.retry_after_seconds)
        self.use_registry(registry)

    def use_registry(self, registry: Registry, declared: Registry | None = None) -> None:
        """Compile what the hot path reads; called again when live weights change the registry
        (`declared`: the file as written, so rules know which versions were taken out of traffic)."""
        self._routes = compile_routes(registry, declared)
        self._ensembles = compile_ensembles(registry, self._routes)
        plans = {name: route.oip for name, route in self._routes.items() if route.oip is not None}
        self._oip_endpoints = compile_endpoints(registry, plans)
        self._routes |= named_version_routes(registry, self._routes)
        if (self._ensembles or plans) and self._egress is None:
            raise ValueError("a registry with ensembles or OIP models needs an egress client")
        # Backend reads answer within the header phase's budget, with room for Envoy's own hops.
        self._oip_budget_s = registry.broker.message_timeout_ms / 1000 * 0.8
        self._oip_server_docs: dict[str, dict[str, Any]] = {
            wire.ROUTE_OIP_LIVE: {"live": True},
            wire.ROUTE_OIP_READY: {"ready": True},
            wire.ROUTE_OIP_SERVER: server_metadata(package_version("model-broker")),
        }
        self._limits = registry.limits
        self._registry = registry
        self._models = describe_models(registry)
        self._models_doc = orjson.dumps(self._models)
        self._health_doc = {"status": "ok", "registry_version": registry.registry_version}

    async def request_headers(self, msg: HttpHeaders, ctx: RequestContext) -> Answer:
        """Only the broker's own GET routes ask for the header phase."""
        if ctx.route_name == wire.ROUTE_HEALTHZ:
            ctx.finished = True
            return responses.immediate_json(200, self._health_doc, details="healthz")
        if ctx.route_name == wire.ROUTE_MODELS:
            ctx.finished = True
            if self._ground_truth is not None and self._registry.takes_feedback:
                doc = with_ground_truth(self._models, self._registry, self._ground_truth())
                return responses.immediate_json(200, doc, details="models")
            return responses.immediate_json(200, orjson.Fragment(self._models_doc), details="models")
        server_doc = self._oip_server_docs.get(ctx.route_name)
        if server_doc is not None:
            ctx.finished = True
            return responses.immediate_json(200, server_doc, details="v2")
        endpoint = self._oip_endpoints.get(ctx.route_name)
        if endpoint is not None:
            return await self._oip_endpoint(endpoint, ctx)
        return responses.continue_request_headers()

    async def _oip_endpoint(self, endpoint: ModelEndpoint, ctx: RequestContext) -> Answer:
        """A model's metadata or readiness, from its backends through the egress listener."""
        assert self._egress is not None  # use_registry refuses OIP models without one
        ctx.oip = True
        found = await oip_answer(endpoint, self._egress, self._oip_budget_s)
        if isinstance(found, BrokerError):
            return self._reject(found, ctx)
        ctx.finished = True
        metrics.record_request(endpoint.plan.model, ctx.stages, "ok", ctx.consumer)
        return responses.immediate_json(200, found or {"name": endpoint.plan.model, "ready": True}, details="v2")

    async def request_body(self, msg: HttpBody, ctx: RequestContext) -> Answer:
        """The work of a request happens here, so this is where a busy worker refuses more."""
        if not self._admission.admit():
            return self._shed(ctx)
        try:
            return await self._request_body(msg, ctx)
        finally:
            self._admission.release()

    def _shed(self, ctx: RequestContext) -> Answer:
        """503 overloaded + retry-after before any work (nothing started, so nothing to audit), in the route's shape."""
        route = self._routes.get(ctx.route_name)
        ctx.oip = route is not None and route.oip is not None
        answer = self._reject(OVERLOADED, ctx)
        assert isinstance(answer, responses.Immediate)  # a refusal is always an immediate answer
        return dataclasses.replace(answer, headers=(*answer.headers, ("retry-after", self._retry_after)))

    async def _request_body(self, msg: HttpBody, ctx: RequestContext) -> Answer:
        ensemble = self._ensembles.get(ctx.route_name)
        if ensemble is not None:
            assert self._egress is not None  # use_registry refuses ensembles without one
            answered = await answer_ensemble(
                msg.body, ensemble, ctx, store=self._store, client=self._egress, audit=self._audit, limits=self._limits
            )
            return self._reject(answered, ctx) if isinstance(answered, BrokerError) else answered
        route = resolve_route(self._routes, ctx.route_name)
        if isinstance(route, BrokerError):
            return self._reject(route, ctx)
        ctx.route_name = route.model  # an OIP version's own route is audited and counted as its model's
        if route.oip is not None:
            return await self._oip_body(msg.body, route, route.oip, ctx)
        if not self._start_audit(route, msg.body, ctx):
            return self._reject(AUDIT_FULL, ctx)
        answered = await forward_json_request(msg.body, route, ctx, store=self._store, limits=self._limits)
        return self._reject(answered, ctx) if isinstance(answered, BrokerError) else answered

    def _start_audit(self, route: ModelRoute, raw: bytes, ctx: RequestContext) -> bool:
        """Open the execution's audit draft; False when the trail refuses (nothing runs unaudited)."""
        if self._audit is not None and self._audit.covers(route.model):
            if self._audit.refuses():
                return False
            ctx.audit = AuditDraft(
                route.model, ctx.started_at, request_sha256=sha256(raw), consumer=ctx.consumer or None
            )
        return True

    async def _oip_body(self, raw: bytes, route: ModelRoute, plan: OipPlan, ctx: RequestContext) -> Answer:
        """An OIP infer request, audited from the start and answered in OIP's error shape."""
        ctx.oip = True
        if not self._start_audit(route, raw, ctx):
            return self._reject(AUDIT_FULL, ctx)
        enriched = await enrich_infer_request(raw, route, plan, ctx, store=self._store, limits=self._limits)
        if isinstance(enriched, BrokerError):
            return self._reject(enriched, ctx)
        sticky = None  # OIP models are sticky by header only (the registry checks): Envoy hashes it
        return forward_to_split(route, enriched.body, enriched.degraded, sticky, ctx, pinned=enriched.pinned)

    def _reject(self, error: BrokerError, ctx: RequestContext) -> Answer:
        ctx.lap("reject")
        ctx.finished = True
        metrics.record_request(ctx.route_name, ctx.stages, error.code.value, ctx.consumer)
        if ctx.audit is not None:
            ctx.audit.error_code = error.code.value
            body = orjson.dumps(error_json(error)) if ctx.oip else error_body(error, ctx.request_id)
            if not self._write_audit(ctx, error.status, body):
                error = AUDIT_FULL
        return self._error_answer(error, ctx, [(wire.HEADER_SERVER_TIMING, ctx.server_timing())])

    @staticmethod
    def _error_answer(error: BrokerError, ctx: RequestContext, headers: list[tuple[str, str]]) -> Answer:
        """The error in the shape the route's clients read."""
        if ctx.oip:  # OIP clients read `error` as one string; the id travels in its header
            headers = [*headers, (wire.HEADER_REQUEST_ID, ctx.request_id)]
            return responses.immediate_json(error.status, error_json(error), details=error.code.value, headers=headers)
        return responses.error_response(error, ctx.request_id, headers=headers)

    async def response_body(self, msg: HttpBody, ctx: RequestContext) -> Answer:
        """Audited routes only: the record reaches the spool before the response is released.

        The response's status and version arrive as attributes of this message; Envoy's
        audit hold keeps the headers back until this answer (see `envoy.audit_hold`).
        """
        ctx.lap("upstream")
        ctx.finished = True  # the last phase any route asks for
        ctx.route_name = wire.oip_route_model(ctx.route_name) or ctx.route_name  # an OIP version's route: its model
        if ctx.audit is None and self._audit is not None and self._audit.covers(ctx.route_name):
            # Envoy refused the request before any body phase (it had no body): audit that answer too.
            ctx.audit = AuditDraft(ctx.route_name, ctx.started_at, consumer=ctx.consumer or None)
        if ctx.audit is None or ctx.audit.written:
            return responses.continue_response_body()
        if not self._write_audit(ctx, ctx.response_status, msg.body):
            return self._error_answer(AUDIT_FULL, ctx, [])
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
