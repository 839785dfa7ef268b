"""The configured audit sink, and a process's own spool and shipper to it (each broker worker, the control plane)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from extproc.audit import LocalAuditStore, Shipper, ShipTiming, Spool
from extproc.registry import Audit

if TYPE_CHECKING:
    from extproc.adapters.aws_audit import AwsAuditStore


def open_audit_store(conf: Audit, *, reader: bool = False) -> AwsAuditStore | LocalAuditStore:
    """The configured sink, which is also what `audit show|list` reads (`reader`)."""
    if conf.sink.aws is not None:
        from extproc.adapters.aws_audit import AwsAuditStore, reader_budget  # boto3 loads only where AWS is configured

        sink = conf.sink.aws
        return AwsAuditStore(sink, timeout_s=reader_budget(sink) if reader else sink.timeout_ms / 1000)
    assert conf.sink.local is not None  # the registry guarantees one of the two
    return LocalAuditStore(Path(conf.sink.local.dir))


def open_spool(conf: Audit, name: str, max_bytes: int) -> tuple[Spool, Shipper]:
    """A spool of its own (`<spool.dir>/<name>`, no other process touches it) and the shipper that empties it."""
    spool = Spool(
        Path(conf.spool.dir) / name,
        max_bytes=max_bytes,
        segment_bytes=conf.spool.segment_bytes,
        min_free_bytes=conf.spool.min_free_bytes,
    )
    spool.open()
    timing = ShipTiming(
        interval_s=conf.ship_interval_ms / 1000,
        seal_after_s=conf.spool.seal_after_ms / 1000,
        fsync_interval_s=conf.spool.fsync_interval_ms / 1000,
    )
    return spool, Shipper(spool, open_audit_store(conf), timing)
