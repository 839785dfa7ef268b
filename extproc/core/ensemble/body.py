"""The body phase of an ensemble route: parse, key, fan out, aggregate, audit each member call.

Always answers at once (the members were called here, through Envoy's egress listener);
a refusal before the fan-out comes back as a `BrokerError` for the processor to answer.
"""

from __future__ import annotations

from typing import Any

import orjson

from extproc import metrics, wire
from extproc.audit.record import AuditDraft, AuditTrail, error_body, sha256
from extproc.core import responses
from extproc.core.admission import AUDIT_FULL
from extproc.core.body import read_document
from extproc.core.context import RequestContext
from extproc.core.ensemble.aggregate import MemberFailure, MemberOutcome, ensemble_answer
from extproc.core.ensemble.fanout import EnsemblePlan, MemberClient, run_ensemble
from extproc.core.features import FeatureStore
from extproc.core.responses import Answer
from extproc.errors import BrokerError
from extproc.registry import Limits


async def answer_ensemble(
    raw: bytes,
    plan: EnsemblePlan,
    ctx: RequestContext,
    *,
    store: FeatureStore,
    client: MemberClient,
    audit: AuditTrail | None,
    limits: Limits,
) -> Answer | BrokerError:
    """The ensemble's immediate answer (its own shortfalls included), or the refusal that stopped it first."""
    doc = read_document(raw, ctx.content_type, limits)
    if isinstance(doc, BrokerError):
        return doc
    ref = plan.keys.ref(doc)
    if isinstance(ref, BrokerError):
        return ref
    # The trail, if it covers any member: then nothing runs that it cannot record.
    trail = audit if audit is not None and any(audit.covers(m.route.model) for m in plan.members) else None
    if trail is not None and trail.refuses():
        return AUDIT_FULL
    ctx.lap("route")
    outcomes = await run_ensemble(
        plan,
        doc,
        ref,
        store=store,
        client=client,
        parent_request_id=ctx.request_id,
        started_at=ctx.started_at,
    )
    ctx.lap("ensemble")
    if isinstance(outcomes, BrokerError):
        return outcomes
    status, answer = ensemble_answer(
        plan.name, outcomes, min_success=plan.min_success, combiner=plan.combiner, request_id=ctx.request_id
    )
    ctx.finished = True  # an immediate response: Envoy sends nothing more
    if trail is not None:
        _audit_members(trail, outcomes, ctx, doc=doc, key=ref.label, request_sha256=sha256(raw))
    # Labelled by route name, as the processor labels this ensemble's early refusals.
    outcome = answer["error"]["code"] if "error" in answer else "ok"
    metrics.record_request(ctx.route_name, ctx.stages, outcome, ctx.consumer)
    return responses.immediate_json(
        status, answer, details="ensemble", headers=[(wire.HEADER_SERVER_TIMING, ctx.server_timing())]
    )


def _audit_members(
    audit: AuditTrail,
    outcomes: list[MemberOutcome],
    ctx: RequestContext,
    *,
    doc: dict[str, Any],
    key: str,
    request_sha256: str,
) -> None:
    """One record per audited member call, linked to the client's request by parent_request_id."""
    for outcome in outcomes:
        if not audit.covers(outcome.model):
            continue
        draft = AuditDraft(
            outcome.model,
            ctx.started_at,
            request_sha256=request_sha256,
            input=doc,
            entity_key=key,
            features=outcome.features,
            feature_status="ok" if outcome.features is not None else None,
            parent_request_id=ctx.request_id,
            consumer=ctx.consumer or None,
        )
        if isinstance(outcome, MemberFailure):
            draft.error_code = outcome.error.code.value
            body = error_body(outcome.error, outcome.request_id or ctx.request_id)
        else:
            body = orjson.dumps(outcome.output)
        audit.write(
            draft,
            # Envoy's id of the member call; a call that never got one is named after its parent.
            request_id=outcome.request_id or f"{ctx.request_id}.{outcome.model}",
            route=ctx.route_name,
            version=outcome.version or None,
            stages=[("upstream", outcome.latency_ms / 1000)],
            status=outcome.status,
            body=body,
        )
