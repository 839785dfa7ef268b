"""Envoy's edge protections, from the registry's `listener` and `overload` sections.

Envoy's defaults suit a service mesh; at the edge they leave slowloris, connection
floods and memory growth open. These builders follow Envoy's "Configuring Envoy as
an edge proxy" page: the overload manager (heap, global connections), a
per-listener connection limit, header and idle timeouts, header count and size,
HTTP/2 stream and window limits, buffer limits, and an ext_proc cluster that
sheds by circuit breaker and steps around a dead worker.
"""

from __future__ import annotations

from datetime import timedelta

from envoy_data_plane.envoy.config.cluster.v3 import (
    CircuitBreakers,
    CircuitBreakersThresholds,
    Cluster,
    OutlierDetection,
)
from envoy_data_plane.envoy.config.common.mutation_rules.v3 import HeaderMutation as Mutation
from envoy_data_plane.envoy.config.common.mutation_rules.v3 import HeaderMutationRemoveOnMatch
from envoy_data_plane.envoy.config.core.v3 import (
    BackoffStrategy,
    HealthCheck,
    HealthCheckTcpHealthCheck,
    Http2ProtocolOptions,
    HttpProtocolOptions,
    HttpProtocolOptionsHeadersWithUnderscoresAction,
    RetryPolicy,
    RetryPolicyRetryHostPredicate,
    RuntimeUInt64,
)
from envoy_data_plane.envoy.config.listener.v3 import Filter, Listener
from envoy_data_plane.envoy.config.overload.v3 import (
    OverloadAction,
    OverloadManager,
    ResourceMonitor,
    ThresholdTrigger,
    Trigger,
)
from envoy_data_plane.envoy.extensions.filters.http.header_mutation.v3 import HeaderMutation, Mutations
from envoy_data_plane.envoy.extensions.filters.network.connection_limit.v3 import ConnectionLimit
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpFilter,
)
from envoy_data_plane.envoy.extensions.resource_monitors.downstream_connections.v3 import (
    DownstreamConnectionsConfig,
)
from envoy_data_plane.envoy.extensions.resource_monitors.fixed_heap.v3 import FixedHeapConfig
from envoy_data_plane.envoy.extensions.retry.host.previous_hosts.v3 import PreviousHostsPredicate
from envoy_data_plane.envoy.type.matcher.v3 import StringMatcher

from extproc import wire
from extproc.envoy.common import _any, _ms
from extproc.registry import Registry

HEAP_MONITOR = "envoy.resource_monitors.fixed_heap"
# The heap budget can be changed live through the admin's runtime layer (break glass, tests).
HEAP_RUNTIME_KEY = "model_broker.overload.max_heap_bytes"
CONNECTIONS_MONITOR = "envoy.resource_monitors.global_downstream_max_connections"
# Heap pressure at which Envoy returns free memory to the OS, and stops taking requests.
SHRINK_HEAP_AT, STOP_REQUESTS_AT = 0.95, 0.98
# Envoy's response-code details when the overload manager refuses a request.
OVERLOAD_DETAILS = "overload"
CONNECTION_LIMIT_FILTER = "envoy.filters.network.connection_limit"
STRIP_FILTER = "model_broker.strip_identity_headers"
# The ext_proc cluster: a worker that refuses a connection is ejected at once and
# probed back; the probe is a TCP connect (the worker serves nothing else).
HEALTH_INTERVAL_MS, EJECTION_MS = 500, 5_000
# A probe waits longer than the interval: a worker slowed by a busy machine is not a dead one.
HEALTH_TIMEOUT_MS = 1_000
# A broker message is sent again only when no worker answered it: the connection failed or was
# reset before the worker's first answer (a worker killed mid-message). Never on an answer.
RETRY_ON = "reset,connect-failure,refused-stream"
# Each to another worker than the ones tried (two dead workers at once still leave a third).
STREAM_RETRIES, RETRY_BASE_MS, RETRY_MAX_MS = 2, 5, 50
PREVIOUS_HOSTS = "envoy.retry_host_predicates.previous_hosts"


def overload_manager(registry: Registry) -> OverloadManager:
    """Shed before falling over: heap (shrink, then refuse requests) and all listeners' connections."""
    overload = registry.overload
    heap = FixedHeapConfig(
        max_heap_size_bytes_runtime=RuntimeUInt64(default_value=overload.max_heap_bytes, runtime_key=HEAP_RUNTIME_KEY)
    )
    connections = DownstreamConnectionsConfig(max_active_downstream_connections=overload.max_downstream_connections)
    return OverloadManager(
        refresh_interval=timedelta(milliseconds=250),
        resource_monitors=[
            ResourceMonitor(name=HEAP_MONITOR, typed_config=_any(heap)),
            ResourceMonitor(name=CONNECTIONS_MONITOR, typed_config=_any(connections)),
        ],
        actions=[
            _on_heap("envoy.overload_actions.shrink_heap", SHRINK_HEAP_AT),
            _on_heap("envoy.overload_actions.stop_accepting_requests", STOP_REQUESTS_AT),
        ],
    )


def _on_heap(action: str, pressure: float) -> OverloadAction:
    return OverloadAction(
        name=action, triggers=[Trigger(name=HEAP_MONITOR, threshold=ThresholdTrigger(value=pressure))]
    )


def limit_connections(listener: Listener, registry: Registry) -> Listener:
    """Past `listener.max_connections` a new connection is closed at once
    (counted `connection_limit.public.limited_connections`); 32 KiB buffered per connection."""
    limit = ConnectionLimit(stat_prefix=listener.name, max_connections=registry.listener.max_connections)
    for chain in listener.filter_chains:
        chain.filters.insert(0, Filter(name=CONNECTION_LIMIT_FILTER, typed_config=_any(limit)))
    listener.per_connection_buffer_limit_bytes = registry.listener.buffer_limit_bytes
    return listener


def protect(hcm: HttpConnectionManager, registry: Registry) -> HttpConnectionManager:
    """Timeouts, header limits and HTTP/2 limits of the public listener's connection manager."""
    listener = registry.listener
    hcm.request_headers_timeout = _ms(listener.request_headers_timeout_ms)
    hcm.request_timeout = _ms(listener.request_timeout_ms)
    hcm.stream_idle_timeout = _ms(listener.stream_idle_timeout_ms)
    hcm.max_request_headers_kb = listener.max_request_headers_kb
    hcm.common_http_protocol_options = HttpProtocolOptions(
        idle_timeout=_ms(listener.idle_timeout_ms),
        max_headers_count=listener.max_headers_count,
        # `x_api_key` and `x-api-key` must not be two spellings of one header to a model.
        headers_with_underscores_action=HttpProtocolOptionsHeadersWithUnderscoresAction.REJECT_REQUEST,
    )
    http2 = listener.http2
    hcm.http2_protocol_options = Http2ProtocolOptions(
        max_concurrent_streams=http2.max_concurrent_streams,
        initial_stream_window_size=http2.initial_stream_window_size,
        initial_connection_window_size=http2.initial_connection_window_size,
    )
    return hcm


def strip_identity_headers() -> HttpFilter:
    """First on the public listener: every `x-broker-*` a client sent is gone before anything reads it.

    Only Envoy's own filters and the broker set these (consumer, sticky key, shadow
    tag, parent request id), in open mode as with consumers.
    """
    strip = Mutation(
        remove_on_match=HeaderMutationRemoveOnMatch(key_matcher=StringMatcher(prefix=wire.BROKER_HEADER_PREFIX))
    )
    config = HeaderMutation(mutations=Mutations(request_mutations=[strip]))
    return HttpFilter(name=STRIP_FILTER, typed_config=_any(config))


def stream_retry() -> RetryPolicy:
    """The gRPC ext_proc stream of a model route, sent again to another worker when its worker died
    before answering its first message.

    Safe because nothing has run yet: the broker calls no model while it answers a
    request phase (ensembles do, so their filter has no retry), and Envoy calls the
    model only after the answer. Envoy keeps the stream's messages for the retry
    (up to 64 KiB) and retries only before the worker's first answer, so a stream
    already past its first phase (an audited route waiting for its response phase)
    is not retried: its model ran, and the record it owed cannot be written.
    """
    return RetryPolicy(
        retry_on=RETRY_ON,
        num_retries=STREAM_RETRIES,
        retry_back_off=BackoffStrategy(base_interval=_ms(RETRY_BASE_MS), max_interval=_ms(RETRY_MAX_MS)),
        retry_host_predicate=[
            RetryPolicyRetryHostPredicate(name=PREVIOUS_HOSTS, typed_config=_any(PreviousHostsPredicate()))
        ],
        # How often Envoy picks again when the balancer lands on a worker already tried.
        host_selection_retry_max_attempts=5,
    )


def resilient(cluster: Cluster, registry: Registry, workers: int) -> Cluster:
    """An ext_proc cluster (gRPC or http_service): circuit breakers sized to the workers, a dead worker
    ejected and probed back; the streams it held are retried (`stream_retry`)."""
    broker = registry.broker
    streams = workers * broker.max_streams
    cluster.circuit_breakers = CircuitBreakers(
        # HTTP/1.1 (the http_service transport) holds one connection per request in flight.
        # Retries as many as streams: a killed worker's streams are retried at once (Envoy's default is 3).
        thresholds=[
            CircuitBreakersThresholds(
                max_requests=streams, max_pending_requests=streams, max_connections=streams, max_retries=streams
            )
        ]
    )
    cluster.outlier_detection = OutlierDetection(
        # Connection refused or reset: Envoy's own (local-origin) errors, told apart from gRPC statuses.
        split_external_local_origin_errors=True,
        consecutive_local_origin_failure=1,
        enforcing_consecutive_local_origin_failure=100,
        interval=_ms(HEALTH_INTERVAL_MS),
        base_ejection_time=_ms(EJECTION_MS),
        max_ejection_percent=100,
        successful_active_health_check_uneject_host=True,
    )
    cluster.health_checks = [
        HealthCheck(
            timeout=_ms(HEALTH_TIMEOUT_MS),
            interval=_ms(HEALTH_INTERVAL_MS),
            no_traffic_interval=_ms(HEALTH_INTERVAL_MS),
            unhealthy_interval=_ms(HEALTH_INTERVAL_MS),
            unhealthy_threshold=1,
            healthy_threshold=1,
            tcp_health_check=HealthCheckTcpHealthCheck(),
        )
    ]
    return cluster
