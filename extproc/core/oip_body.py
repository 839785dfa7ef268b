"""The body phase of an Open Inference Protocol infer request: keys read, features fetched, tensors added.

Beside `oip/` rather than in it: `oip/` is the pure protocol that `routing` compiles
from, while this phase reads the feature store and so sits above `routing` and `rows`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from extproc.core.body import too_large
from extproc.core.context import RequestContext
from extproc.core.entity import EntityRef
from extproc.core.features import Features, FeatureStore
from extproc.core.logic import ModelLogic, audit_rule, record_logic
from extproc.core.oip import (
    InferRequest,
    OipLogicOutcome,
    OipPlan,
    apply_oip_logic,
    feature_tensors,
    forward_body,
    read_infer_request,
)
from extproc.core.routing import ModelRoute
from extproc.core.rows import Rows, fetch_features
from extproc.errors import BrokerError
from extproc.registry import Limits


@dataclass(frozen=True, slots=True)
class Enriched:
    """What goes on to Envoy: the re-encoded body, the store's degradation ("" if none), a rule's pinned version."""

    body: bytes
    degraded: str
    pinned: str | None


async def enrich_infer_request(
    raw: bytes, route: ModelRoute, plan: OipPlan, ctx: RequestContext, *, store: FeatureStore, limits: Limits
) -> Enriched | BrokerError:
    """Keys from the request's tensor, parameter or header; features (and derived ones) added as tensors.

    Fills the audit draft as it goes, so a refusal's record shows how far the request got.
    """
    if len(raw) > limits.max_body_bytes:
        return too_large(limits.max_body_bytes)
    header_key = ctx.headers.get(plan.key_header, "") if plan.key_header is not None else ""
    request = read_infer_request(
        plan, raw, content_type=ctx.content_type, header_key=header_key, max_depth=limits.max_json_depth
    )
    if isinstance(request, BrokerError):
        return request
    if ctx.audit is not None:
        ctx.audit.input = dict(request.doc)
        ctx.audit.entity_key = request.keys[0] if len(request.keys) == 1 else None
    ctx.lap("route")
    rows, degraded = await _feature_rows(store, route, request.keys)
    ctx.lap("features")
    if isinstance(rows, BrokerError):
        return rows
    if ctx.audit is not None:
        ctx.audit.features = dict(zip(request.keys, rows, strict=True)) if rows else None
        ctx.audit.feature_status = degraded or "ok"
    prepared = _tensors(route, plan, request, rows, degraded=degraded, ctx=ctx)
    if isinstance(prepared, BrokerError):
        return prepared
    tensors, pinned = prepared
    return Enriched(forward_body(plan, request, tensors), degraded, pinned)


async def _feature_rows(
    store: FeatureStore, route: ModelRoute, keys: tuple[str, ...]
) -> tuple[list[Features] | BrokerError, str]:
    """Each row's features (every distinct key in one store round trip), or the policy's answer."""
    refs: list[EntityRef] = []
    for key in dict.fromkeys(keys):
        ref = route.keys.ref_of_text(key)
        if isinstance(ref, BrokerError):
            return ref, ""
        refs.append(ref)
    settled = await fetch_features(store, route, Rows([{}] * len(refs), refs))
    if isinstance(settled, BrokerError):
        return settled, ""
    if settled.degraded == "feature_store_unavailable":  # fail-open with the store down: no rows
        return [], settled.degraded
    by_key = dict(zip(dict.fromkeys(keys), settled.features, strict=True))
    return [by_key[k] for k in keys], settled.degraded


def _tensors(
    route: ModelRoute,
    plan: OipPlan,
    request: InferRequest,
    rows: list[Features],
    *,
    degraded: str,
    ctx: RequestContext,
) -> tuple[list[dict[str, Any]], str | None] | BrokerError:
    """The tensors to inject (stored and derived features) and the version a rule pinned."""
    pinned = None
    if route.logic is not None:
        outcome = _logic(route, route.logic, request, rows or [{}] * len(request.keys), degraded=degraded, ctx=ctx)
        if isinstance(outcome, BrokerError):
            return outcome
        pinned = outcome.decision.version if outcome.decision is not None else None
        rows = outcome.rows if rows else rows
    # Fail-open with the store down: the model gets the client's tensors only.
    if degraded:
        return [], pinned
    tensors = feature_tensors(plan, request.keys, rows, route.join_key)
    return tensors if isinstance(tensors, BrokerError) else (tensors, pinned)


def _logic(
    route: ModelRoute,
    logic: ModelLogic,
    request: InferRequest,
    rows: list[Features],
    *,
    degraded: str,
    ctx: RequestContext,
) -> OipLogicOutcome | BrokerError:
    """Derived features per row and the rules over all rows, counted and kept for the audit record."""
    outcome = apply_oip_logic(
        logic,
        request.doc,
        request.keys,
        rows,
        join_key=route.join_key,
        started_at=ctx.started_at,
        degraded=degraded,
        withdrawn=route.withdrawn,
        sticky=ctx.headers.get(route.sticky_header, "") if route.sticky_header is not None else None,
    )
    ctx.lap("rules")
    if isinstance(outcome, OipLogicOutcome):
        record_logic(route.model, outcome.failed_features, outcome.decision)
        if ctx.audit is not None:
            ctx.audit.features = dict(zip(request.keys, outcome.rows, strict=True))
            ctx.audit.derived = {"values": outcome.derived, "errors": outcome.derived_errors}
            ctx.audit.rule = audit_rule(outcome.decision)
    return outcome
