"""Prometheus metrics: the broker's stages (the same ones as Server-Timing) and outcomes.

Workers write through prometheus_client's multiprocess mode (the supervisor
sets PROMETHEUS_MULTIPROC_DIR before spawning them); the supervisor serves the
aggregate on `metrics.port`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Stage durations are tens of microseconds to tens of milliseconds.
STAGE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)

STAGE_SECONDS = Histogram(
    "model_broker_stage_seconds",
    "Time the broker spent per stage of a request (route, features, body, reject).",
    ["model", "stage"],
    buckets=STAGE_BUCKETS,
)
REQUESTS = Counter(
    "model_broker_requests_total",
    "Requests the broker answered, by model, outcome (ok, degraded reason, or error code) and consumer.",
    # The consumer Envoy verified ("" in open mode): a bounded set, declared in the registry.
    ["model", "outcome", "consumer"],
)
FEATURE_CACHE = Counter(
    "model_broker_feature_cache_total",
    "Feature lookups by cache result (hit, miss).",
    ["result"],
)
AUDIT_DROPPED = Counter(
    "model_broker_audit_dropped_total",
    "Audit records not spooled because the spool was full (dropped under `when_full: drop`, else refused).",
    ["model"],
)
CACHE_HIT = FEATURE_CACHE.labels("hit")
CACHE_MISS = FEATURE_CACHE.labels("miss")


def record_request(model: str, stages: Iterable[tuple[str, float]], outcome: str, consumer: str = "") -> None:
    for stage, seconds in stages:
        STAGE_SECONDS.labels(model, stage).observe(seconds)
    REQUESTS.labels(model, outcome, consumer).inc()


def prepare_multiprocess_dir() -> str:
    """A fresh directory for the workers' metric files, exported to the children's environment."""
    directory = tempfile.mkdtemp(prefix="model-broker-metrics-")
    os.environ[MULTIPROC_ENV] = directory
    return directory


def serve_aggregate(address: str, port: int) -> None:
    """Serve every worker's metrics, summed, from a daemon thread of the supervisor."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # prometheus_client leaves it untyped
    start_http_server(port, addr=address, registry=registry)


def remove_multiprocess_dir(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)
