"""Ensembles inside one request: members fanned out through Envoy's egress listener, answers aggregated.

Part of the core because the processor's body phase drives it and it reuses the core's body,
feature and routing steps; its client (`MemberClient`) is a protocol the egress adapter implements.
`fanout` (plans, member calls) → `aggregate` (one answer) ← `body` (an ensemble route's body phase).
"""

from extproc.core.ensemble.aggregate import (
    TIMEOUT_CODES,
    Combiner,
    MemberFailure,
    MemberOutcome,
    MemberResult,
    combine,
    ensemble_answer,
    shortfall,
)
from extproc.core.ensemble.body import answer_ensemble
from extproc.core.ensemble.fanout import (
    EnsemblePlan,
    MemberClient,
    MemberPlan,
    MemberReply,
    MemberUnavailable,
    compile_ensembles,
    reply_outcome,
    run_ensemble,
)

__all__ = [
    "TIMEOUT_CODES",
    "Combiner",
    "EnsemblePlan",
    "MemberClient",
    "MemberFailure",
    "MemberOutcome",
    "MemberPlan",
    "MemberReply",
    "MemberResult",
    "MemberUnavailable",
    "answer_ensemble",
    "combine",
    "compile_ensembles",
    "ensemble_answer",
    "reply_outcome",
    "run_ensemble",
    "shortfall",
]
