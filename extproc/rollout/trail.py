"""The control plane's part of the audit trail: rollout events and shadow comparisons, spooled then shipped.

Its own spool directory (`<spool.dir>/control-plane`, a worker's share of the bound)
and shipper to the registry's sink, as each broker worker has. The control plane
never refuses a weight change for want of spool room: a record that does not fit is
counted as dropped and logged (the local event log beside the state file keeps it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import orjson

from extproc import metrics
from extproc.adapters.audit_store import open_spool
from extproc.audit import Record, Shipper, Spool, compile_redaction, rollout_record, shadow_record
from extproc.registry import Registry

log = logging.getLogger("model_broker.control_plane.trail")

SPOOL_NAME = "control-plane"
# What is left unshipped at stop ships on the next start, as for workers.
SHIP_ON_STOP_SECONDS = 5.0


class ControlPlaneTrail:
    def __init__(self, spool: Spool, shipper: Shipper, redact_paths: tuple[str, ...]) -> None:
        self._spool = spool
        self.shipper = shipper
        self._rules = compile_redaction(redact_paths)

    def rollout(self, event: str, model: str, source: str, fields: Mapping[str, Any]) -> None:
        self._write(rollout_record(event, model, source, fields, time.time()))

    def shadow(self, comparison: Mapping[str, Any]) -> None:
        self._write(shadow_record(comparison, self._rules, time.time()))

    def _write(self, record: Record) -> None:
        if not self._spool.append(orjson.dumps(record) + b"\n"):
            metrics.AUDIT_DROPPED.labels(record["model"]).inc()
            log.error("audit spool full: %s not recorded in the trail", record["request_id"])

    async def run(self, stop: asyncio.Event) -> None:
        """Ship until `stop`, then seal and ship what is left (within a budget)."""
        await self.shipper.run(stop)
        await self.shipper.drain(SHIP_ON_STOP_SECONDS)


def open_trail(registry: Registry) -> ControlPlaneTrail | None:
    """The control plane's spool and shipper, when the registry has an audit section.

    None also when the spool cannot be opened: the control plane keeps serving weights
    (fail open: its events stay in the local log beside the state file), loudly.
    """
    conf = registry.audit
    if conf is None:
        return None
    try:
        spool, shipper = open_spool(conf, SPOOL_NAME, conf.spool.max_bytes // registry.broker.workers)
    except OSError as exc:
        log.error(
            "audit spool %s/%s unusable, rollout events stay out of the trail: %s", conf.spool.dir, SPOOL_NAME, exc
        )
        return None
    return ControlPlaneTrail(spool, shipper, conf.redact)
