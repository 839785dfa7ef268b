"""Canary judgement, pure: parsing Envoy's OTLP stats, the sliding window, thresholds, the rollback split."""

from __future__ import annotations

import math

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric

from extproc.registry import RolloutPolicy
from extproc.rollout.health import (
    Health,
    Outcomes,
    OutcomeWindow,
    judge,
    next_step,
    outcomes_by_cluster,
    promotion_weights,
    quantile_upper_bound,
    rollback_weights,
)


def tags(**values: str) -> list[KeyValue]:
    return [KeyValue(key=f"envoy.{k}", value=AnyValue(string_value=v)) for k, v in values.items()]


def counter(name: str, value: int, **labels: str) -> Metric:
    metric = Metric(name=name)
    metric.sum.data_points.add(as_int=value).attributes.extend(tags(**labels))
    return metric


def export(*metrics: Metric) -> ExportMetricsServiceRequest:
    request = ExportMetricsServiceRequest()
    request.resource_metrics.add().instrumentation_library_metrics.add().metrics.extend(metrics)
    return request


def test_outcomes_from_an_envoy_export() -> None:
    """Completed requests, 5xx and latency buckets per version cluster; other clusters and classes ignored."""
    latency = Metric(name="cluster.upstream_rq_time")
    point = latency.histogram.data_points.add(count=3, bucket_counts=[1, 2, 0], explicit_bounds=[1.0, 5.0])
    point.attributes.extend(tags(cluster_name="m--v2"))
    request = export(
        counter("cluster.upstream_rq_completed", 10, cluster_name="m--v2"),
        counter("cluster.upstream_rq_xx", 7, cluster_name="m--v2", response_code_class="2"),
        counter("cluster.upstream_rq_xx", 3, cluster_name="m--v2", response_code_class="5"),
        counter("cluster.upstream_rq_completed", 99, cluster_name="model_broker_ext_proc"),
        latency,
    )
    assert outcomes_by_cluster(request, {"m--v1", "m--v2"}) == {
        "m--v2": Outcomes(requests=10, errors=3, bounds=(1.0, 5.0), buckets=[1, 2, 0])
    }


QUANTILES = [
    ("empty", [0, 0, 0], None),
    ("first-bucket", [100, 0, 0], 1.0),
    ("p95-in-second", [90, 10, 0], 5.0),
    ("overflow", [0, 0, 5], math.inf),
]


@pytest.mark.parametrize(("case", "counts", "expected"), QUANTILES, ids=[q[0] for q in QUANTILES])
def test_p95_upper_bound(case: str, counts: list[int], expected: float | None) -> None:
    """p95 is the upper bound of its bucket: never under the truth."""
    assert quantile_upper_bound((1.0, 5.0), counts, 0.95) == expected


POLICY = RolloutPolicy(canary="v2", window_seconds=10, min_requests=20, max_error_rate=0.1, max_p95_ms=200)
VERDICTS = [
    ("too-few-to-judge", Health(19, 19, 10.0), None),
    ("healthy", Health(100, 10, 150.0), None),
    ("errors", Health(100, 11, 10.0), "error_rate"),
    ("slow", Health(100, 0, 250.0), "p95_latency"),
    ("no-latency-yet", Health(100, 0, None), None),
]


@pytest.mark.parametrize(("case", "health", "reason"), VERDICTS, ids=[v[0] for v in VERDICTS])
def test_judge(case: str, health: Health, reason: str | None) -> None:
    """Nothing is decided below min_requests; above it, the error rate then the p95 ceiling."""
    breach = judge(POLICY, health)
    assert (breach.reason if breach else None) == reason


def test_window_forgets_old_intervals() -> None:
    """Only intervals within `seconds` of now count."""
    window = OutcomeWindow(10)
    window.add(0.0, Outcomes(requests=50, errors=50))
    window.add(8.0, Outcomes(requests=10, errors=1, bounds=(1.0,), buckets=[10, 0]))
    assert window.health(9.0) == Health(60, 51, 1.0)
    assert window.health(12.0) == Health(10, 1, 1.0)


@pytest.mark.parametrize(
    ("weights", "expected"),
    [({"v1": 90, "v2": 10}, {"v1": 90, "v2": 0}), ({"v1": 0, "v2": 100, "v3": 0}, {"v1": 100, "v2": 0, "v3": 0})],
    ids=["canary-share", "canary-had-everything"],
)
def test_rollback_weights(weights: dict[str, int], expected: dict[str, int]) -> None:
    """The canary goes to 0; if it had all the traffic, the first other version takes it."""
    assert rollback_weights(weights, "v2") == expected


STEPS = RolloutPolicy(canary="v2", promote_steps=(5, 25, 50, 100))
PROMOTIONS = [
    ("first-step", {"v1": 100, "v2": 0}, 5, {"v1": 95, "v2": 5}),
    ("next-step", {"v1": 95, "v2": 5}, 25, {"v1": 75, "v2": 25}),
    ("between-steps", {"v1": 70, "v2": 30}, 50, {"v1": 50, "v2": 50}),
    ("rounding-to-largest", {"v1": 2, "v2": 1, "v3": 1}, 50, {"v1": 34, "v2": 50, "v3": 16}),
    ("done", {"v1": 0, "v2": 1}, None, None),
]


@pytest.mark.parametrize(("case", "weights", "step", "after"), PROMOTIONS, ids=[p[0] for p in PROMOTIONS])
def test_promotion(case: str, weights: dict[str, int], step: int | None, after: dict[str, int] | None) -> None:
    """The next step above the canary's share; the others keep their proportions, out of 100."""
    assert next_step(STEPS, weights) == step
    if step is not None:
        assert promotion_weights(weights, "v2", step) == after


def test_promotion_steps_must_rise() -> None:
    """Steps that do not strictly increase are a registry error."""
    with pytest.raises(ValueError, match="strictly increase"):
        RolloutPolicy(canary="v2", promote_steps=(50, 25))
