"""The last step of a model route's body phase (JSON or OIP): the enriched body goes on to Envoy.

Approved, timed and counted here, so both body phases hand over the same metadata.
"""

from __future__ import annotations

from typing import Any

from extproc import metrics, wire
from extproc.core import responses
from extproc.core.context import RequestContext
from extproc.core.responses import Answer
from extproc.core.routing import ModelRoute


def forward_to_split(
    route: ModelRoute,
    body: bytes,
    degraded: str,
    sticky: str | None,
    ctx: RequestContext,
    *,
    pinned: str | None = None,
) -> Answer:
    """The enriched body goes on to Envoy's split (or the version a rule pinned), approved and timed."""
    ctx.lap("body")
    metadata: dict[str, Any] = {wire.META_APPROVED: True, wire.META_SERVER_TIMING: ctx.server_timing()}
    if degraded:
        metadata[wire.META_DEGRADED] = degraded
    if pinned is not None:
        metadata[wire.META_PIN] = pinned
    metrics.record_request(route.model, ctx.stages, degraded or "ok", ctx.consumer)
    # Model routes ask for the request body only (sticky ones send the headers first);
    # audited ones also send the response.
    ctx.finished = ctx.audit is None
    if sticky is not None:
        return responses.reroute_request_body(body, metadata, [(wire.HEADER_STICKY_KEY, sticky)])
    return responses.continue_request_body(body, metadata, reroute=pinned is not None)
