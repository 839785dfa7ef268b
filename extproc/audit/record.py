"""The audit record: what one model execution was, built from the request and response phases.

Pure builders (record, redaction, summary) plus the `AuditSink` protocol
the shipper writes through; `AuditTrail` is the thin edge that spools a record
before the response is released.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from extproc import metrics
from extproc.audit.fields import SCHEMA_VERSION
from extproc.audit.spool import Spool
from extproc.errors import BrokerError

log = logging.getLogger("model_broker.audit")

REDACTED = "[REDACTED]"

Record = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Redaction:
    """Field paths to hide (`contact.email` → ("contact", "email")), compiled once per registry."""

    rules: tuple[tuple[str, ...], ...] = ()
    # Only a key that ends some rule can match: one set lookup spares the path test for the rest.
    last: frozenset[str] = frozenset()


@dataclass(slots=True)
class AuditDraft:
    """What the request phase learned about one execution, kept until its response is seen."""

    model: str
    started_at: float
    request_sha256: str = ""
    input: Any = None
    entity_key: str | None = None
    features: dict[str, Any] | None = None
    feature_status: str | None = None
    # Each requested feature's status (present, missing, stale); a list of them for a batch.
    feature_statuses: Any = None
    error_code: str | None = None
    # Set by ensembles for each member call; a single call has none.
    parent_request_id: str | None = None
    # The consumer Envoy verified (API key or JWT); None in open mode.
    consumer: str | None = None
    # Derived features: {"values": {...}, "errors": {feature: why}}; the segment rule's decision.
    derived: dict[str, Any] | None = None
    rule: dict[str, Any] | None = None
    written: bool = False


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def iso_utc(epoch_seconds: float) -> str:
    """Fixed-width UTC timestamps sort as strings: DynamoDB's sort key relies on it."""
    # datetime's own rounding (fraction to the nearest microsecond), at a fifth of its cost.
    fraction, whole = math.modf(epoch_seconds)
    seconds, micros = divmod(int(whole) * 1_000_000 + round(fraction * 1_000_000), 1_000_000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}.{micros:06d}Z"


def compile_redaction(paths: Iterable[str]) -> Redaction:
    rules = tuple(tuple(path.split(".")) for path in paths)
    return Redaction(rules, frozenset(rule[-1] for rule in rules))


def _matches(trail: tuple[str, ...], redaction: Redaction) -> bool:
    return trail[-1] in redaction.last and any(
        trail[-len(rule) :] == rule for rule in redaction.rules if len(rule) <= len(trail)
    )


def redact(value: Any, redaction: Redaction, trail: tuple[str, ...] = ()) -> Any:
    """A copy of `value` with every key whose path ends with a rule replaced by a marker.

    A rule matches at any depth (`email` hits `customer.email` and `email`), so a
    field the model echoes back in its answer is caught as well as the input's.
    """
    if not redaction.rules:
        return value
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            name = str(key)
            # The set lookup first: most keys end no rule, and then no path is built for them.
            if name in redaction.last and _matches((*trail, name), redaction):
                out[key] = REDACTED
            elif isinstance(item, dict | list):
                out[key] = redact(item, redaction, (*trail, name))
            else:
                out[key] = item
        return out
    if isinstance(value, list):
        return [redact(item, redaction, trail) if isinstance(item, dict | list) else item for item in value]
    return value


def parse_json_or_none(raw: bytes) -> Any:
    """Bodies are stored parsed; what does not parse is stored as null (only its hash remains).

    Unparsed text could not be redacted, so it is never written.
    """
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def response_error_code(status: int, body: Any) -> str | None:
    """The error code a failed response carried (the broker's JSON shape), else `http_<status>`."""
    if status < 400:
        return None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = body["error"].get("code")
        if isinstance(code, str):
            return code
    return f"http_{status}"


@dataclass(frozen=True, slots=True)
class RecordContext:
    """What Envoy told the broker about the request: ids, route, version, timings."""

    request_id: str
    route: str
    version: str | None
    registry_version: str
    entity: str | None
    join_key: str | None
    stages: Sequence[tuple[str, float]]


def build_record(draft: AuditDraft, where: RecordContext, status: int | None, body: bytes, rules: Redaction) -> Record:
    """The record of one execution, redacted; `status` None means no response was seen."""
    answer = parse_json_or_none(body)
    latency = {name: round(seconds * 1000, 3) for name, seconds in where.stages}
    latency["total"] = round(sum(seconds for _, seconds in where.stages) * 1000, 3)
    key_hidden = where.join_key is not None and _matches((where.join_key,), rules)
    error_code = draft.error_code or (response_error_code(status, answer) if status is not None else "incomplete")
    return {
        "schema": SCHEMA_VERSION,
        "kind": "execution",
        "request_id": where.request_id,
        "parent_request_id": draft.parent_request_id,
        "timestamp": iso_utc(draft.started_at),
        "consumer": draft.consumer,
        "route": where.route,
        "model": draft.model,
        "version": where.version,
        "registry_version": where.registry_version,
        "entity": {
            "name": where.entity,
            "key": REDACTED if key_hidden and draft.entity_key is not None else draft.entity_key,
        },
        "input": redact(draft.input, rules),
        "features": redact(draft.features, rules),
        "feature_status": draft.feature_status,
        "derived": redact(draft.derived, rules),
        "rule": draft.rule,
        "feature_statuses": draft.feature_statuses,
        "response": {"status": status, "body": redact(answer, rules)},
        "sha256": {"request": draft.request_sha256, "response": sha256(body) if status is not None else ""},
        "latency_ms": latency,
        "error_code": error_code,
    }


def error_body(error: BrokerError, request_id: str) -> bytes:
    return orjson.dumps(error.to_json(request_id))


def _at(record: Record, *path: str) -> Any:
    """A nested field, or None where the record has no such part (rollout and shadow records)."""
    value: Any = record
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def summary(record: Record) -> dict[str, Any]:
    """The metadata kept beside the payload (the DynamoDB item, the `audit list` line), for every kind."""
    return {
        "request_id": record["request_id"],
        "timestamp": record["timestamp"],
        "model": record["model"],
        "kind": record.get("kind") or "execution",  # schema 1 had executions only
        "version": record.get("version"),
        "route": record.get("route"),
        "status": _at(record, "response", "status"),
        "error_code": record.get("error_code"),
        "latency_ms": _at(record, "latency_ms", "total"),
        "registry_version": record.get("registry_version"),
        "entity_key": _at(record, "entity", "key"),
        "parent_request_id": record.get("parent_request_id"),
        "request_sha256": _at(record, "sha256", "request"),
        "response_sha256": _at(record, "sha256", "response"),
        "event": _at(record, "rollout", "event"),
    }


class AuditSinkUnavailable(Exception):
    """The sink did not take a batch (AWS down, disk full); raised by sinks, retried by the shipper."""


class AuditSink(Protocol):
    """Where shipped records end up. Blocking: the shipper calls it in a thread."""

    def put(self, batch_id: str, records: Sequence[Record]) -> None:
        """Store every record idempotently (storing one twice leaves one copy); raise AuditSinkUnavailable."""
        ...

    def close(self) -> None: ...


class AuditTrail:
    """One worker's audit edge: which models are audited, and the spool each record reaches first."""

    def __init__(
        self,
        spool: Spool,
        *,
        entities: dict[str, tuple[str, str]],
        redact_paths: Iterable[str],
        registry_version: str,
        fail_closed: bool,
    ) -> None:
        self._spool = spool
        # Audited model name → (entity name, join key).
        self._entities = entities
        self._rules = compile_redaction(redact_paths)
        self._registry_version = registry_version
        self.fail_closed = fail_closed
        # Records not written since the last one that was: logs once per outage.
        self._dropped = 0

    def use_registry(self, entities: dict[str, tuple[str, str]], registry_version: str) -> None:
        """A reloaded registry: models audited from now on, and the version records name."""
        self._entities, self._registry_version = entities, registry_version

    def covers(self, route_name: str) -> bool:
        return route_name in self._entities

    def refuses(self) -> bool:
        """True when the spool cannot take a record and the policy is fail-closed: run nothing that
        cannot be audited (asked before the model is called: bound, free space, write probe)."""
        return self.fail_closed and not self._spool.writable()

    def write(
        self,
        draft: AuditDraft,
        *,
        request_id: str,
        route: str,
        version: str | None,
        stages: Sequence[tuple[str, float]],
        status: int | None,
        body: bytes,
    ) -> bool:
        """Spool the record; False means it was not written and the policy is fail-closed."""
        entity, join_key = self._entities.get(draft.model, (None, None))
        where = RecordContext(request_id, route, version, self._registry_version, entity, join_key, stages)
        record = build_record(draft, where, status, body, self._rules)
        draft.written = True
        if self._spool.append(orjson.dumps(record) + b"\n"):
            if self._dropped:
                log.warning("audit spool takes records again after %d were not written", self._dropped)
                self._dropped = 0
            return True
        metrics.AUDIT_DROPPED.labels(draft.model).inc()
        if not self._dropped:  # once per outage, not once per request: the counter has the total
            policy = "dropped (when_full: drop)" if not self.fail_closed else "refused (fail_closed)"
            log.warning(
                "audit spool cannot take record %s: %s; see model_broker_audit_dropped_total", request_id, policy
            )
        self._dropped += 1
        return not self.fail_closed


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_when(text: str, now: float) -> str | None:
    """`--since`/`--until` as an ISO timestamp: ISO date/time (naive = UTC) or an age like `15m`, `2h`, `7d`.

    None when the text is neither.
    """
    text = text.strip()
    if len(text) > 1 and text[-1] in _UNITS and text[:-1].isdigit():
        return iso_utc(now - int(text[:-1]) * _UNITS[text[-1]])
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return iso_utc(when.timestamp())
