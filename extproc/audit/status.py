"""`model-broker audit status`: how far the shipper is behind, read from the spool directories themselves.

The spool is on disk and each segment is named by its creation time, so the depth
and the age of the oldest unshipped record are known whether or not the broker
runs; the ship counters come from the broker's metrics endpoint when it answers.
"""

from __future__ import annotations

import contextlib
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from extproc.audit.spool import OPEN_SUFFIX, SEALED_SUFFIX, created_at

# `audit status` waits this long for the broker's metrics; a broker that is down only loses the counters.
METRICS_TIMEOUT_S = 2.0
# What `audit status` reads from `/metrics` (all workers summed by the supervisor).
COUNTERS = {
    "model_broker_audit_shipped": "shipped_records",
    "model_broker_audit_ship_failures": "ship_failures",
    "model_broker_audit_dropped": "dropped_records",
}


def _segments(worker: Path) -> list[tuple[Path, int]]:
    found = []
    for path in worker.iterdir():
        if path.suffix in (OPEN_SUFFIX, SEALED_SUFFIX):
            with contextlib.suppress(FileNotFoundError):  # shipped and deleted while we looked
                found.append((path, path.stat().st_size))
    return found


def worker_status(worker: Path, now: float) -> dict[str, Any]:
    segments = _segments(worker)
    oldest = min((created_at(p) for p, _ in segments), default=None)
    return {
        "worker": worker.name,
        "bytes": sum(size for _, size in segments),
        "segments": len(segments),
        "sealed": sum(1 for p, _ in segments if p.suffix == SEALED_SUFFIX),
        "oldest_unshipped_seconds": None if oldest is None else round(max(0.0, now - oldest), 3),
    }


def spool_status(directory: Path, max_bytes: int, now: float) -> dict[str, Any]:
    """Depth per worker and in total, against the bound; ages in seconds (None: nothing waits)."""
    # One directory per writing process: `worker-<port>` for each broker worker, `control-plane`.
    owners = sorted(p for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else []
    workers = [worker_status(w, now) for w in owners]
    ages = [w["oldest_unshipped_seconds"] for w in workers if w["oldest_unshipped_seconds"] is not None]
    used = sum(w["bytes"] for w in workers)
    return {
        "spool_dir": str(directory),
        "bytes": used,
        "max_bytes": max_bytes,
        "fill": round(used / max_bytes, 4),
        "oldest_unshipped_seconds": max(ages, default=None),
        "workers": workers,
    }


def ship_counters(families: Iterable[Any]) -> dict[str, float]:
    """The audit counters out of parsed Prometheus text (prometheus_client's parser families)."""
    found = dict.fromkeys(COUNTERS.values(), 0.0)
    for family in families:
        name = COUNTERS.get(family.name)
        if name is not None:
            found[name] += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return found


def broker_counters(address: str, port: int) -> dict[str, float] | None:
    """The running broker's audit counters from its `/metrics`; None when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://{address}:{port}/metrics", timeout=METRICS_TIMEOUT_S) as answer:
            text = answer.read().decode()
    except (OSError, urllib.error.URLError):
        return None
    return ship_counters(text_string_to_metric_families(text))
