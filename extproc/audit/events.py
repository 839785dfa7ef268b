"""Records of what happened to a model besides its executions: rollout events and shadow comparisons.

The control plane writes them into its own spool and ships them like executions, so
they land in the same `date=…/model=…` objects and the same `audit list`: an auditor
sees a model's releases (weight changes, promotions, rollbacks and their reason) and
its shadow's answers beside its executions. Pure builders; ids are fixed when the
record is built, so a re-shipped record overwrites itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from extproc.audit.fields import SCHEMA_VERSION
from extproc.audit.record import Record, Redaction, iso_utc, redact


def rollout_record(event: str, model: str, source: str, fields: Mapping[str, Any], now: float) -> Record:
    """A weight change (`weights_changed`, `promotion`, `rollback`), who made it and why."""
    revision = fields.get("revision")
    return {
        "schema": SCHEMA_VERSION,
        "kind": "rollout",
        "request_id": f"rollout:{model}:{int(now * 1000)}:{revision}",
        "parent_request_id": None,
        "timestamp": iso_utc(now),
        "model": model,
        "version": None,
        "rollout": {"event": event, "source": source, **fields},
    }


def shadow_record(comparison: Mapping[str, Any], rules: Redaction, now: float) -> Record:
    """The primary's and the shadow's answer to one request, compared; linked to the execution by its id."""
    request_id = comparison["request_id"]
    # Both answers whole, redacted as an execution's response is (a rule matches at any depth).
    answers = redact({"primary": comparison["primary"], "shadow": comparison["shadow"]}, rules)
    return {
        "schema": SCHEMA_VERSION,
        "kind": "shadow",
        "request_id": f"shadow:{request_id}",
        "parent_request_id": request_id,
        "timestamp": iso_utc(now),
        "model": comparison["model"],
        "version": comparison["primary_version"],
        "shadow": {
            "version": comparison["shadow_version"],
            "field": comparison["field"],
            "match": comparison["match"],
            "abs_diff": comparison["abs_diff"],
            **answers,
        },
    }
