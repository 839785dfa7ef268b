"""The audit section: spool, sinks and what is recorded."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from extproc.registry.common import Strict
from extproc.registry.patterns import AWS_REGION, DYNAMODB_TABLE, FIELD_PATH, HTTP_URL, S3_BUCKET, S3_PREFIX


class Spool(Strict):
    """The local append-only spool every audit record reaches before its response is released."""

    dir: str
    # The whole spool; each worker owns an equal share (its own subdirectory).
    max_bytes: Annotated[int, Field(ge=4096, le=1 << 40)] = 1 << 30
    segment_bytes: Annotated[int, Field(ge=1024, le=1 << 30)] = 4 << 20
    # A non-empty segment is sealed (and so becomes shippable) after this long.
    seal_after_ms: Annotated[int, Field(ge=10, le=3_600_000)] = 2000
    fsync_interval_ms: Annotated[int, Field(ge=10, le=60_000)] = 1000
    # fail_closed: no room for the record → 503 audit_unavailable. drop: answer, count the loss.
    when_full: Literal["fail_closed", "drop"] = "fail_closed"
    # Free space the spool's filesystem must keep; below it the spool counts as full (the disk
    # fills from elsewhere too, and a write that fails after the model ran is too late).
    min_free_bytes: Annotated[int, Field(ge=0, le=1 << 50)] = 16 << 20


class LocalAuditSink(Strict):
    """JSONL files in a directory: the embedded default, no AWS needed."""

    dir: str


class AwsAuditSink(Strict):
    """Payloads to S3, metadata to DynamoDB; credentials from the standard AWS chain."""

    bucket: Annotated[str, Field(pattern=S3_BUCKET)]
    prefix: Annotated[str, Field(pattern=S3_PREFIX)] = "audit"
    table: Annotated[str, Field(pattern=DYNAMODB_TABLE)]
    region: Annotated[str, Field(pattern=AWS_REGION)] = "us-east-1"
    # moto, MinIO or LocalStack; None means AWS itself.
    endpoint_url: Annotated[str, Field(pattern=HTTP_URL)] | None = None
    # Time budget of one S3/DynamoDB call; a slower call counts as an outage.
    timeout_ms: Annotated[int, Field(ge=100, le=120_000)] = 5000


class AuditSinks(Strict):
    local: LocalAuditSink | None = None
    aws: AwsAuditSink | None = None

    @model_validator(mode="after")
    def _one_sink(self) -> AuditSinks:
        if (self.local is None) == (self.aws is None):
            raise ValueError("declare exactly one of 'local' or 'aws'")
        return self


class Audit(Strict):
    """Audit trail: spool first, then shipped to the sink in the background."""

    # The default for every model; `models[].audit` overrides it.
    enabled: bool = True
    spool: Spool
    sink: AuditSinks
    # Dotted field paths (`ssn`, `customer.email`) removed from input, features and
    # response before anything is written; a path matches at any depth.
    redact: tuple[Annotated[str, Field(pattern=FIELD_PATH)], ...] = ()
    ship_interval_ms: Annotated[int, Field(ge=10, le=600_000)] = 1000
