"""Prometheus metrics: the broker's stages (the same ones as Server-Timing) and outcomes.

Workers write through prometheus_client's multiprocess mode (the supervisor
sets PROMETHEUS_MULTIPROC_DIR before spawning them); the supervisor serves the
aggregate on `metrics.port`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server, values
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# In multiprocess mode every increment asks the kernel for the pid (to notice a fork):
# 8 getpid syscalls per request, a third of the metrics' cost. Broker processes are
# spawned, never forked after import, so the pid read here stays theirs.
_PID = os.getpid()
if MULTIPROC_ENV in os.environ:
    values.ValueClass = values.MultiProcessValue(process_identifier=lambda: _PID)  # type: ignore[no-untyped-call]

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
# Backpressure of the audit trail, per worker, summed/maxed over the live workers.
AUDIT_SPOOL_BYTES = Gauge(
    "model_broker_audit_spool_bytes",
    "Bytes waiting in the audit spool (written, not yet shipped); fail_closed refuses at `spool.max_bytes`.",
    multiprocess_mode="livesum",
)
AUDIT_OLDEST_SECONDS = Gauge(
    "model_broker_audit_oldest_unshipped_seconds",
    "Age of the oldest audit record not yet shipped (0 when the spool is empty).",
    multiprocess_mode="livemax",
)
AUDIT_SHIPPED = Counter("model_broker_audit_shipped_total", "Audit records shipped to the sink.")
AUDIT_SHIP_FAILURES = Counter(
    "model_broker_audit_ship_failures_total", "Segments the sink did not take (retried with backoff)."
)
FEATURES = Counter(
    "model_broker_features_total",
    "Requested features by model, feature and status (present, missing, stale), one count per row.",
    # Bounded: the features the registry declares for each model.
    ["model", "feature", "status"],
)
CACHE_HIT = FEATURE_CACHE.labels("hit")
CACHE_MISS = FEATURE_CACHE.labels("miss")
# Written by the control plane process; "mostrecent" so a restarted control plane's value wins.
VERSION_WEIGHT = Gauge(
    "model_broker_version_weight",
    "Live traffic weight of each model version, as every Envoy has it from the control plane.",
    ["model", "version"],
    multiprocess_mode="mostrecent",
)


RULES = Counter(
    "model_broker_rules_total",
    "Segment rule decisions by model, rule and outcome: matched, withdrawn (its version is out of traffic; "
    "the weighted split decided), error (the condition failed to evaluate); no_match under rule ''.",
    ["model", "rule", "outcome"],
)
DERIVED_FAILURES = Counter(
    "model_broker_derived_failures_total",
    "Derived features whose expression failed at run time (then the model's missing_features policy applies).",
    ["model", "feature"],
)


# Labelled children by label values: `labels()` validates and locks on every call.
_CHILDREN: dict[tuple[object, ...], Any] = {}


def _child(metric: Counter | Histogram, *labels: str) -> Any:
    key = (metric, *labels)
    child = _CHILDREN.get(key)
    if child is None:
        child = _CHILDREN[key] = metric.labels(*labels)
    return child


def record_logic(
    model: str, failed_features: Iterable[str], decided_by: str | None, outcome: str | None, failed_rules: Iterable[str]
) -> None:
    """One request's derived-feature failures and rule decision (`outcome` None: the model has no rules)."""
    for feature in failed_features:
        _child(DERIVED_FAILURES, model, feature).inc()
    for rule in failed_rules:
        _child(RULES, model, rule, "error").inc()
    if outcome is not None:
        _child(RULES, model, decided_by or "", outcome).inc()


_FEATURES: dict[tuple[str, str, str], Counter] = {}


def record_feature_status(model: str, statuses: Mapping[str, str]) -> None:
    for feature, status in statuses.items():
        counter = _FEATURES.get((model, feature, status))
        if counter is None:
            counter = _FEATURES[model, feature, status] = FEATURES.labels(model, feature, status)
        counter.inc()


def record_request(model: str, stages: Iterable[tuple[str, float]], outcome: str, consumer: str = "") -> None:
    for stage, seconds in stages:
        _child(STAGE_SECONDS, model, stage).observe(seconds)
    _child(REQUESTS, model, outcome, consumer).inc()


ROLLBACKS = Counter(
    "model_broker_rollbacks_total",
    "Automatic rollbacks of a canary, by the threshold it crossed (error_rate, p95_latency).",
    ["model", "version", "reason"],
)
# From the stats every Envoy pushes to the control plane: no cost on the request path.
VERSION_REQUESTS = Counter(
    "model_broker_version_requests_total",
    "Requests completed by each model version, over every Envoy.",
    ["model", "version"],
)
VERSION_ERRORS = Counter(
    "model_broker_version_errors_total", "5xx answers of each model version, over every Envoy.", ["model", "version"]
)


def record_version_outcomes(model: str, version: str, requests: int, errors: int) -> None:
    if requests:
        VERSION_REQUESTS.labels(model, version).inc(requests)
    if errors:
        VERSION_ERRORS.labels(model, version).inc(errors)


SHADOW_COMPARISONS = Counter(
    "model_broker_shadow_comparisons_total",
    "Requests whose primary and shadow answers were compared, by whether the compared field matched.",
    ["model", "shadow", "result"],
)
SHADOW_ABS_DIFF = Histogram(
    "model_broker_shadow_abs_difference",
    "|primary - shadow| of the compared numeric field (sum/count is the mean absolute difference).",
    ["model", "shadow"],
    buckets=(0.0, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0),
)


def record_shadow(model: str, shadow: str, match: bool, abs_diff: float | None) -> None:
    SHADOW_COMPARISONS.labels(model, shadow, "match" if match else "mismatch").inc()
    if abs_diff is not None:
        SHADOW_ABS_DIFF.labels(model, shadow).observe(abs_diff)


# Written by the control plane's model-registry follower.
MODEL_REGISTRY_UP = Gauge(
    "model_broker_model_registry_up",
    "1 when the model's registry (MLflow) answered the last poll, 0 when it could not be reached.",
    ["model"],
    multiprocess_mode="mostrecent",
)
MODEL_REGISTRY_ERRORS = Counter(
    "model_broker_model_registry_errors_total",
    "Registry polls that changed nothing because of a problem (registry_unreachable, two_aliases, ...).",
    ["model", "code"],
)
RELEASES = Counter(
    "model_broker_releases_total",
    "Releases from the model registry by outcome: started, promoted, rolled_back, aborted, replaced.",
    ["model", "outcome"],
)

# From the persisted rollout events, so a restarted control plane reports the same rate.
PROMOTION_RATE = Gauge(
    "model_broker_promotion_rate",
    "Releases promoted over releases started from the model registry, per model (absent before the first).",
    ["model"],
    multiprocess_mode="mostrecent",
)
PROMOTIONS = Gauge(
    "model_broker_promotions",
    "Releases from the model registry per model: started, and promoted (succeeded), since the events log began.",
    ["model", "outcome"],
    multiprocess_mode="mostrecent",
)


# Ground truth, written by the control plane from the persisted labels (so the same after a restart).
# `role`: `served` (the version answered the client) or `shadow` (its mirrored answer, scored against the same truth).
FEEDBACK_LABELLED = Gauge(
    "model_broker_feedback_labelled",
    "Answers with ground truth joined (POST /v1/feedback), per model, version and role (served, shadow).",
    ["model", "version", "role"],
    multiprocess_mode="mostrecent",
)
FEEDBACK_ACCURACY = Gauge(
    "model_broker_feedback_accuracy",
    "Share of labelled answers equal to the truth (classification models), per model, version and role.",
    ["model", "version", "role"],
    multiprocess_mode="mostrecent",
)
FEEDBACK_MAE = Gauge(
    "model_broker_feedback_mae",
    "Mean absolute error of labelled answers against the truth (regression models), per model, version and role.",
    ["model", "version", "role"],
    multiprocess_mode="mostrecent",
)
FEEDBACK_POSTED = Counter(
    "model_broker_feedback_total",
    "Truths posted, by model ('' when unknown) and outcome: labelled, duplicate, or the error code.",
    ["model", "outcome"],
)


def set_feedback(model: str, version: str, role: str, *, kind: str, labelled: int, value: float | None) -> None:
    FEEDBACK_LABELLED.labels(model, version, role).set(labelled)
    if value is not None:
        (FEEDBACK_ACCURACY if kind == "classification" else FEEDBACK_MAE).labels(model, version, role).set(value)


def set_promotion_rate(model: str, started: int, promoted: int) -> None:
    PROMOTIONS.labels(model, "started").set(started)
    PROMOTIONS.labels(model, "promoted").set(promoted)
    if started:
        PROMOTION_RATE.labels(model).set(promoted / started)


def set_weights(model: str, weights: Mapping[str, int]) -> None:
    for version, weight in weights.items():
        VERSION_WEIGHT.labels(model, version).set(weight)


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
