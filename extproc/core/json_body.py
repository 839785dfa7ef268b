"""The body phase of a JSON model route: parse, rows and entity keys, features, derived ones and rules, inject.

Hands the enriched body on to Envoy's split; a refusal comes back as a `BrokerError`
for the processor to answer (and audit: the processor opens the draft, this fills it in).
"""

from __future__ import annotations

from typing import Any

from extproc.core.body import read_document, sticky_key
from extproc.core.context import RequestContext
from extproc.core.features import Features, FeatureStore
from extproc.core.forward import forward_to_split
from extproc.core.logic import LogicOutcome, ModelLogic, apply_logic, audit_rule, record_logic
from extproc.core.responses import Answer
from extproc.core.routing import ModelRoute
from extproc.core.rows import Rows, body_rows, fetch_features, inject_rows
from extproc.errors import BrokerError
from extproc.registry import Limits


async def forward_json_request(
    raw: bytes, route: ModelRoute, ctx: RequestContext, *, store: FeatureStore, limits: Limits
) -> Answer | BrokerError:
    """Enrich the body and let Envoy's weighted split pick the version (or a rule pin it).

    Fills the audit draft as it goes, so a refusal's record shows how far the request got.
    """
    doc = read_document(raw, ctx.content_type, limits)
    if isinstance(doc, BrokerError):
        return doc
    rows = body_rows(doc, route)
    if ctx.audit is not None:
        # A shallow copy: injection replaces one top-level key of `doc` (or of each batch row).
        ctx.audit.input, ctx.audit.entity_key = dict(doc), None if isinstance(rows, BrokerError) else rows.label
    if isinstance(rows, BrokerError):
        return rows
    ctx.lap("route")
    settled = await _settled_features(store, route, doc, rows, ctx)
    if isinstance(settled, BrokerError):
        return settled
    features, degraded, pinned = settled
    body = inject_rows(doc, rows, route.inject_as, features)
    sticky = sticky_key(doc, route.sticky_field) if route.sticky_field is not None else None
    return forward_to_split(route, body, degraded, sticky, ctx, pinned=pinned)


async def _settled_features(
    store: FeatureStore, route: ModelRoute, doc: dict[str, Any], rows: Rows, ctx: RequestContext
) -> tuple[list[Features], str, str | None] | BrokerError:
    """Each row's stored features (after the store policies), then derived ones and the rules' pinned version.

    Derived features and rules take one row (the registry refuses them beside `batch`).
    """
    settled = await fetch_features(store, route, rows)
    ctx.lap("features")
    if isinstance(settled, BrokerError):
        return settled
    degraded = settled.degraded
    if ctx.audit is not None:
        ctx.audit.features = settled.audit_features(rows.batched)
        ctx.audit.feature_status = degraded or "ok"
        ctx.audit.feature_statuses = settled.audit_statuses(rows.batched)
    if route.logic is None or rows.batched:
        return settled.features, degraded, None
    outcome = _run_logic(route, route.logic, doc, settled.features[0], degraded=degraded, ctx=ctx)
    ctx.lap("rules")
    if isinstance(outcome, BrokerError):
        return outcome
    decision = outcome.decision
    return [outcome.features], outcome.degraded, decision.version if decision is not None else None


def _run_logic(
    route: ModelRoute,
    logic: ModelLogic,
    doc: dict[str, Any],
    features: Features,
    *,
    degraded: str,
    ctx: RequestContext,
) -> LogicOutcome | BrokerError:
    """Derived features and rules for one request, counted and kept for its audit record."""
    sticky = sticky_key(doc, route.sticky_field) if route.sticky_field is not None else None
    if route.sticky_header is not None:
        sticky = ctx.headers.get(route.sticky_header, "")
    outcome = apply_logic(
        logic, doc, features, started_at=ctx.started_at, degraded=degraded, withdrawn=route.withdrawn, sticky=sticky
    )
    if isinstance(outcome, LogicOutcome):
        record_logic(route.model, outcome.derived_errors, outcome.decision)
        if ctx.audit is not None:
            ctx.audit.features, ctx.audit.feature_status = outcome.features, outcome.degraded or "ok"
            ctx.audit.derived = {"values": outcome.derived, "errors": outcome.derived_errors}
            ctx.audit.rule = audit_rule(outcome.decision)
    return outcome
