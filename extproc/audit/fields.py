"""The audit record's schema, field by field: what auditors query the shipped objects with.

The README's schema table is checked against this one, and the query-engine test
builds its columnar schema from it. Changes are additive only: a new field gets a
new `since` version and old records simply lack it; no field changes type or meaning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

# The version new records carry in their `schema` field.
SCHEMA_VERSION: Final = 2

FieldType = Literal["int64", "double", "string", "timestamp", "object", "json"]
# What a record is about. Records without `kind` (schema 1) are executions.
KINDS: Final = ("execution", "rollout", "shadow")


@dataclass(frozen=True, slots=True)
class Field:
    """One field: dotted path, type (`timestamp` is an ISO 8601 UTC string; `object`/`json` are model-shaped)."""

    path: str
    type: FieldType
    nullable: bool
    meaning: str
    since: int = 1


FIELDS: Final = (
    Field("schema", "int64", False, "version of this schema the record follows"),
    Field("kind", "string", True, "`execution`, `rollout` (a weight change) or `shadow` (a shadow comparison)", 2),
    Field("request_id", "string", False, "Envoy's `x-request-id` of the call (the key of `audit show`)"),
    Field("parent_request_id", "string", True, "the client's request id when this was an ensemble member call"),
    Field("timestamp", "timestamp", False, "when the broker saw the request: fixed-width UTC, sorts as a string"),
    Field("consumer", "string", True, "the consumer Envoy verified (API key or JWT); null in open mode"),
    Field("route", "string", False, "the route called: the model, or `ensemble:<name>`"),
    Field("model", "string", False, "the model executed (also the `model=` partition)"),
    Field("version", "string", True, "the version whose host answered, as Envoy reported it; null if none did"),
    Field("registry_version", "string", False, "`registry_version` of the registry being served"),
    Field("entity.name", "string", True, "the entity the model is keyed by"),
    Field("entity.key", "string", True, "the entity key sent (`[REDACTED]` when its field is redacted)"),
    Field("input", "object", True, "the request body as received, redacted; null if it was not a JSON object"),
    Field("features", "object", True, "the features injected, redacted"),
    Field("feature_status", "string", True, "`ok`, or the degraded reason of a fail-open model"),
    Field(
        "derived",
        "object",
        True,
        "derived features: `values` computed, `errors` (feature: expression and cause); null without any",
        since=2,
    ),
    Field(
        "rule",
        "object",
        True,
        "the segment rules' decision: `name`, `outcome`, `version` pinned, `errors`; null without rules",
        since=2,
    ),
    Field("response.status", "int64", True, "the HTTP status the client got; null when no response was seen"),
    Field("response.body", "json", True, "the answer as sent, redacted; null if it was not JSON"),
    Field("sha256.request", "string", False, "SHA-256 of the request body as received, before redaction"),
    Field("sha256.response", "string", False, "SHA-256 of the response body as sent; empty when none was seen"),
    Field("latency_ms.total", "double", False, "the broker's and the model's time, in milliseconds"),
    Field("latency_ms", "object", False, "milliseconds per stage: route, features, body, upstream, reject"),
    Field("error_code", "string", True, "the error the client got (broker code or `http_<status>`); null on success"),
    Field("rollout", "object", True, "rollout records: event, source, revision, weights before and after, reason", 2),
    Field("shadow", "object", True, "shadow records: shadow version, compared field, both values, match", 2),
)
