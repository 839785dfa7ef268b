"""Canary health from Envoy's own per-cluster statistics, and the rollback decision.

Every Envoy pushes its stats to the control plane once a second (OpenTelemetry stat
sink, deltas), so judging a canary costs the request path nothing. Pure: parsing one
export, a sliding window per version, the threshold check and the rollback split.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from extproc.registry import RolloutPolicy
from extproc.rollout.weights import Weights

# Envoy's tag-extracted stat names; the cluster and status class come as attributes.
COMPLETED = "cluster.upstream_rq_completed"
BY_CLASS = "cluster.upstream_rq_xx"
LATENCY = "cluster.upstream_rq_time"
CLUSTER_TAG = "envoy.cluster_name"
CLASS_TAG = "envoy.response_code_class"


@dataclass(slots=True)
class Outcomes:
    """What one version did during one flush interval, summed over the Envoys that reported."""

    requests: int = 0
    errors: int = 0
    bounds: tuple[float, ...] = ()
    buckets: list[int] = field(default_factory=list)

    def add_buckets(self, bounds: tuple[float, ...], counts: list[int]) -> None:
        if not self.buckets:
            self.bounds, self.buckets = bounds, [0] * len(counts)
        if bounds == self.bounds and len(counts) == len(self.buckets):
            self.buckets = [a + b for a, b in zip(self.buckets, counts, strict=True)]


def outcomes_by_cluster(request: ExportMetricsServiceRequest, clusters: set[str]) -> dict[str, Outcomes]:
    """The interval's requests, 5xx and latency buckets for the version clusters we judge."""
    found: dict[str, Outcomes] = {}
    for resource in request.resource_metrics:
        # xds-protos bundles a pre-1.0 OTLP schema: field 2 is named `instrumentation_library_metrics`
        # there and `scope_metrics` in what Envoy sends; same number, same wire format.
        for scope in resource.instrumentation_library_metrics:
            for metric in scope.metrics:
                _collect(metric, clusters, found)
    return found


def _tags(point: Any) -> dict[str, str]:
    return {kv.key: kv.value.string_value for kv in point.attributes}


def _collect(metric: Any, clusters: set[str], found: dict[str, Outcomes]) -> None:
    if metric.name in (COMPLETED, BY_CLASS) and metric.HasField("sum"):
        for point in metric.sum.data_points:
            tags = _tags(point)
            cluster = tags.get(CLUSTER_TAG, "")
            if cluster not in clusters:
                continue
            out = found.setdefault(cluster, Outcomes())
            if metric.name == COMPLETED:
                out.requests += point.as_int
            elif tags.get(CLASS_TAG) == "5":
                out.errors += point.as_int
    elif metric.name == LATENCY and metric.HasField("histogram"):
        for point in metric.histogram.data_points:
            cluster = _tags(point).get(CLUSTER_TAG, "")
            if cluster in clusters:
                found.setdefault(cluster, Outcomes()).add_buckets(
                    tuple(point.explicit_bounds), list(point.bucket_counts)
                )


def quantile_upper_bound(bounds: tuple[float, ...], counts: list[int], q: float) -> float | None:
    """The upper bound of the bucket holding the q-quantile (conservative: never under the truth)."""
    total = sum(counts)
    if total == 0:
        return None
    rank = math.ceil(q * total)
    running = 0
    for i, count in enumerate(counts):
        running += count
        if running >= rank:
            return bounds[i] if i < len(bounds) else math.inf
    return math.inf


@dataclass(frozen=True, slots=True)
class Health:
    requests: int
    errors: int
    p95_ms: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


class OutcomeWindow:
    """Outcomes of one version over the last `seconds`, one entry per received interval."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._entries: deque[tuple[float, Outcomes]] = deque()

    def add(self, now: float, outcomes: Outcomes) -> None:
        self._entries.append((now, outcomes))
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._entries and self._entries[0][0] < now - self.seconds:
            self._entries.popleft()

    def health(self, now: float) -> Health:
        self._trim(now)
        total = Outcomes()
        for _, out in self._entries:
            total.requests += out.requests
            total.errors += out.errors
            if out.buckets:
                total.add_buckets(out.bounds, out.buckets)
        return Health(total.requests, total.errors, quantile_upper_bound(total.bounds, total.buckets, 0.95))


@dataclass(frozen=True, slots=True)
class Breach:
    """Why a canary is rolled back, with the numbers that triggered it (they go in the event)."""

    reason: str
    health: Health
    policy: RolloutPolicy

    def detail(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "requests": self.health.requests,
            "errors": self.health.errors,
            "error_rate": round(self.health.error_rate, 4),
            "p95_ms": self.health.p95_ms,
            "window_seconds": self.policy.window_seconds,
            "max_error_rate": self.policy.max_error_rate,
            "max_p95_ms": self.policy.max_p95_ms,
            "min_requests": self.policy.min_requests,
        }


def judge(policy: RolloutPolicy, health: Health) -> Breach | None:
    """A breach once the window holds enough requests; below `min_requests` nothing is decided."""
    if health.requests < policy.min_requests:
        return None
    if health.error_rate > policy.max_error_rate:
        return Breach("error_rate", health, policy)
    if policy.max_p95_ms is not None and health.p95_ms is not None and health.p95_ms > policy.max_p95_ms:
        return Breach("p95_latency", health, policy)
    return None


def canary_percent(weights: Weights, canary: str) -> float:
    total = sum(weights.values())
    return 100 * weights.get(canary, 0) / total if total else 0.0


def next_step(policy: RolloutPolicy, weights: Weights, canary: str | None = None) -> int | None:
    """The next promotion step above the canary's (declared, or the registry's challenger) share, if any."""
    current = canary_percent(weights, canary or policy.canary or "")
    return next((step for step in policy.promote_steps if step > current + 1e-9), None)


def promotion_weights(weights: Weights, canary: str, percent: int) -> Weights:
    """Weights out of 100 with the canary at `percent`; the others share the rest as they did."""
    others = {v: w for v, w in weights.items() if v != canary}
    rest = 100 - percent
    total = sum(others.values())
    if total == 0:
        shares = {v: (rest if i == 0 else 0) for i, v in enumerate(others)}
    else:
        shares = {v: rest * w // total for v, w in others.items()}
        leftover = rest - sum(shares.values())  # integer rounding goes to the largest
        if others and leftover:
            shares[max(others, key=lambda v: others[v])] += leftover
    return {v: (percent if v == canary else shares[v]) for v in weights}


def rollback_weights(weights: Weights, canary: str) -> Weights:
    """The canary to 0; if nothing else had traffic, the first other version takes the canary's share."""
    after = {**weights, canary: 0}
    if sum(after.values()) == 0:
        others = [v for v in weights if v != canary]
        if others:
            after[others[0]] = weights[canary]
    return after
