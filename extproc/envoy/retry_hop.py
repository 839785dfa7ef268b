"""The `http_service` side calls, through an internal listener that retries them and names an overflow.

Envoy 1.40's `http_service` client sends each ext_proc message once (`HttpService` has no
retry policy) and turns every failure into one error (`ext_proc_error_HTTP_ERROR`). So the
`http_service` filters post to a cluster whose one endpoint is this in-process listener:
- a model route's message that no worker answered (connection refused, reset before the
  answer: a worker killed mid-message) is sent to another worker, like the gRPC streams;
  an ensemble's message is not (it calls models), it comes on a path of its own;
- a message the workers' circuit breaker refuses comes back as the ext_proc answer
  "503, details `ext_proc_overflow`", which the public listener labels `overloaded`.
"""

from __future__ import annotations

from envoy_data_plane.envoy.config.accesslog.v3 import AccessLogFilter, ResponseFlagFilter
from envoy_data_plane.envoy.config.cluster.v3 import (
    CircuitBreakers,
    CircuitBreakersThresholds,
    Cluster,
    ClusterDiscoveryType,
)
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    DataSource,
    EnvoyInternalAddress,
    SubstitutionFormatString,
)
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener, ListenerInternalListenerConfig
from envoy_data_plane.envoy.config.route.v3 import (
    RetryPolicy,
    RetryPolicyRetryBackOff,
    RetryPolicyRetryHostPredicate,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpFilter,
    LocalReplyConfig,
    ResponseMapper,
)
from envoy_data_plane.envoy.extensions.retry.host.previous_hosts.v3 import PreviousHostsPredicate

from extproc import wire
from extproc.envoy.common import _any, _ms
from extproc.envoy.edge import PREVIOUS_HOSTS, RETRY_BASE_MS, RETRY_MAX_MS, RETRY_ON, STREAM_RETRIES

# Where an ensemble route's filter posts: the same workers, never retried.
ENSEMBLE_PATH = wire.HTTP_SERVICE_PATH + "/ensemble"
# The details of the answer an overflow becomes; the public listener's mappers read them.
OVERFLOW_DETAILS = "ext_proc_overflow"
# Envoy's response flag for a request its circuit breaker refused.
UPSTREAM_OVERFLOW = "UO"
# The hop's own circuit breaker (in-process connections, one per message in flight).
UNBOUNDED = 1 << 30


def _retry() -> RetryPolicy:
    return RetryPolicy(
        retry_on=RETRY_ON,
        num_retries=STREAM_RETRIES,
        retry_back_off=RetryPolicyRetryBackOff(base_interval=_ms(RETRY_BASE_MS), max_interval=_ms(RETRY_MAX_MS)),
        retry_host_predicate=[
            RetryPolicyRetryHostPredicate(name=PREVIOUS_HOSTS, typed_config=_any(PreviousHostsPredicate()))
        ],
        host_selection_retry_max_attempts=5,
    )


def _overflow_answer() -> ResponseMapper:
    """A refusal by the workers' circuit breaker, as the ext_proc answer the filter turns into a 503."""
    answer = f'{{"immediate_response": {{"status": {{"code": 503}}, "details": "{OVERFLOW_DETAILS}"}}}}'
    return ResponseMapper(
        filter=AccessLogFilter(response_flag_filter=ResponseFlagFilter(flags=[UPSTREAM_OVERFLOW])),
        status_code=200,
        body_format_override=SubstitutionFormatString(
            text_format_source=DataSource(inline_string=answer), content_type="application/json"
        ),
    )


def retry_listener() -> Listener:
    """In-process only: model messages to the workers with retries, ensemble messages without."""
    # No timeout here: the ext_proc filter's message timeout bounds the whole call, retries included.
    routes = [
        Route(
            match=RouteMatch(path=ENSEMBLE_PATH),
            route=RouteAction(
                cluster=wire.EXT_PROC_HTTP_CLUSTER, timeout=_ms(0), prefix_rewrite=wire.HTTP_SERVICE_PATH
            ),
        ),
        Route(
            match=RouteMatch(prefix="/"),
            route=RouteAction(cluster=wire.EXT_PROC_HTTP_CLUSTER, timeout=_ms(0), retry_policy=_retry()),
        ),
    ]
    hcm = HttpConnectionManager(
        stat_prefix="ext_proc_retry",
        route_config=RouteConfiguration(
            name=wire.EXT_PROC_RETRY_LISTENER, virtual_hosts=[VirtualHost(name="broker", domains=["*"], routes=routes)]
        ),
        http_filters=[HttpFilter(name="envoy.filters.http.router", typed_config=_any(Router()))],
        local_reply_config=LocalReplyConfig(mappers=[_overflow_answer()]),
    )
    return Listener(
        name=wire.EXT_PROC_RETRY_LISTENER,
        internal_listener=ListenerInternalListenerConfig(),
        filter_chains=[
            FilterChain(filters=[Filter(name="envoy.filters.network.http_connection_manager", typed_config=_any(hcm))])
        ],
    )


def retry_cluster() -> Cluster:
    """The `http_service` filters' target: the internal listener above.

    Its circuit breaker never trips first: the workers' (`edge.resilient`) is the one that
    sheds, behind the hop, where an overflow can still be told apart. The public listener's
    own limits (connections, streams) bound what waits here.
    """
    address = Address(envoy_internal_address=EnvoyInternalAddress(server_listener_name=wire.EXT_PROC_RETRY_LISTENER))
    return Cluster(
        name=wire.EXT_PROC_RETRY_LISTENER,
        type=ClusterDiscoveryType.STATIC,
        load_assignment=ClusterLoadAssignment(
            cluster_name=wire.EXT_PROC_RETRY_LISTENER,
            endpoints=[LocalityLbEndpoints(lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=address))])],
        ),
        circuit_breakers=CircuitBreakers(
            thresholds=[
                CircuitBreakersThresholds(
                    max_requests=UNBOUNDED, max_pending_requests=UNBOUNDED, max_connections=UNBOUNDED
                )
            ]
        ),
    )
