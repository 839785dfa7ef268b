"""The audit trail: the record of each model execution, spooled before release, then shipped.

`record` (record, redaction, sink protocol, `AuditTrail`) → `spool` (local append-only segments)
→ `shipper` (segments → sink) → `local` (the embedded JSONL sink). The AWS sink is
`extproc.adapters.aws_audit`, the only module importing boto3.
"""

from extproc.audit.local import LocalAuditStore, local_path
from extproc.audit.record import (
    REDACTED,
    SCHEMA_VERSION,
    AuditDraft,
    AuditSink,
    AuditSinkUnavailable,
    AuditTrail,
    Record,
    RecordContext,
    RedactRule,
    build_record,
    compile_redaction,
    error_body,
    iso_utc,
    parse_json_or_none,
    parse_when,
    redact,
    response_error_code,
    s3_key,
    sha256,
    summary,
)
from extproc.audit.shipper import (
    BACKOFF_FIRST_S,
    BACKOFF_MAX_S,
    Shipper,
    ShipTiming,
    next_backoff,
    read_segment,
    ship_segment,
)
from extproc.audit.spool import OPEN_SUFFIX, SEALED_SUFFIX, Segment, Spool, parse_lines, segment_name

__all__ = [
    "BACKOFF_FIRST_S",
    "BACKOFF_MAX_S",
    "OPEN_SUFFIX",
    "REDACTED",
    "SCHEMA_VERSION",
    "SEALED_SUFFIX",
    "AuditDraft",
    "AuditSink",
    "AuditSinkUnavailable",
    "AuditTrail",
    "LocalAuditStore",
    "Record",
    "RecordContext",
    "RedactRule",
    "Segment",
    "ShipTiming",
    "Shipper",
    "Spool",
    "build_record",
    "compile_redaction",
    "error_body",
    "iso_utc",
    "local_path",
    "next_backoff",
    "parse_json_or_none",
    "parse_lines",
    "parse_when",
    "read_segment",
    "redact",
    "response_error_code",
    "s3_key",
    "segment_name",
    "sha256",
    "ship_segment",
    "summary",
]
