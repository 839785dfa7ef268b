"""The audit trail: the record of each model execution, spooled before release, then shipped.

`fields` (the record's documented schema) → `record` (record, redaction, sink protocol,
`AuditTrail`) and `events` (rollout and shadow records, from the control plane) →
`spool` (local append-only segments; `disk` says whether it can take a record now) →
`shipper` (segments → sink, with backpressure metrics) → `objects` (one gzip JSON
Lines object per segment, read back by byte range) → `local` (the embedded JSONL
sink); `status` reads the spool for `audit status`. The AWS sink is
`extproc.adapters.aws_audit`, the only module importing boto3.
"""

from extproc.audit.disk import DiskCheck
from extproc.audit.events import rollout_record, shadow_record
from extproc.audit.fields import FIELDS, KINDS, SCHEMA_VERSION, Field
from extproc.audit.local import LocalAuditStore, local_path
from extproc.audit.objects import OBJECT_SUFFIX, Location, PackedObject, object_key, pack, pack_batch, record_at
from extproc.audit.record import (
    REDACTED,
    AuditDraft,
    AuditSink,
    AuditSinkUnavailable,
    AuditTrail,
    Record,
    RecordContext,
    Redaction,
    build_record,
    compile_redaction,
    error_body,
    iso_utc,
    parse_json_or_none,
    parse_when,
    redact,
    response_error_code,
    sha256,
    summary,
)
from extproc.audit.shipper import (
    BACKOFF_FIRST_S,
    BACKOFF_MAX_S,
    Shipper,
    ShipTiming,
    half_full_message,
    next_backoff,
    read_segment,
    ship_segment,
)
from extproc.audit.spool import (
    OPEN_SUFFIX,
    SEALED_SUFFIX,
    Segment,
    Spool,
    created_at,
    find_spooled,
    parse_lines,
    segment_name,
)
from extproc.audit.status import ship_counters, spool_status, worker_status

__all__ = [
    "BACKOFF_FIRST_S",
    "BACKOFF_MAX_S",
    "FIELDS",
    "KINDS",
    "OBJECT_SUFFIX",
    "OPEN_SUFFIX",
    "REDACTED",
    "SCHEMA_VERSION",
    "SEALED_SUFFIX",
    "AuditDraft",
    "AuditSink",
    "AuditSinkUnavailable",
    "AuditTrail",
    "DiskCheck",
    "Field",
    "LocalAuditStore",
    "Location",
    "PackedObject",
    "Record",
    "RecordContext",
    "Redaction",
    "Segment",
    "ShipTiming",
    "Shipper",
    "Spool",
    "build_record",
    "compile_redaction",
    "created_at",
    "error_body",
    "find_spooled",
    "half_full_message",
    "iso_utc",
    "local_path",
    "next_backoff",
    "object_key",
    "pack",
    "pack_batch",
    "parse_json_or_none",
    "parse_lines",
    "parse_when",
    "read_segment",
    "record_at",
    "redact",
    "response_error_code",
    "rollout_record",
    "segment_name",
    "sha256",
    "shadow_record",
    "ship_counters",
    "ship_segment",
    "spool_status",
    "summary",
    "worker_status",
]
