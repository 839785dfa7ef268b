"""Shadow traffic: the mirror policy, the internal shadow listener and the recorder of answer pairs."""

from __future__ import annotations

from envoy_data_plane.envoy.config.cluster.v3 import (
    Cluster,
    ClusterDiscoveryType,
)
from envoy_data_plane.envoy.config.common.mutation_rules.v3 import HeaderMutation
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    EnvoyInternalAddress,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HeaderValue,
    HeaderValueOption,
    HeaderValueOptionHeaderAppendAction,
)
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener, ListenerInternalListenerConfig
from envoy_data_plane.envoy.config.route.v3 import (
    FilterConfig,
    HeaderMatcher,
    Route,
    RouteAction,
    RouteActionRequestMirrorPolicy,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)
from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import (
    ExternalProcessor,
    ExtProcOverrides,
    ExtProcPerRoute,
    ProcessingMode,
)
from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import ProcessingModeBodySendMode as Body
from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import ProcessingModeHeaderSendMode as Send
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpFilter,
)
from envoy_data_plane.envoy.type.matcher.v3 import (
    StringMatcher,
)
from envoy_data_plane.google.protobuf import Any as AnyMessage

from extproc import wire
from extproc.envoy.common import SHADOW_ROUTES, XdsFiles, _any, _ms, _routes
from extproc.registry import (
    Model,
    Registry,
)


def _shadowed(registry: Registry) -> list[Model]:
    return [m for m in registry.models if m.shadow is not None]


def shadow_recorder_filter(registry: Registry, *, disabled: bool) -> HttpFilter:
    """Streams model answers to the control plane without ever holding them (observability mode:
    Envoy does not wait for the recorder, so a shadowed route's client sees no added latency)."""
    config = ExternalProcessor(
        grpc_service=GrpcService(
            envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=wire.CONTROL_PLANE_CLUSTER),
            timeout=_ms(registry.broker.message_timeout_ms),
        ),
        # Fail open: recording a comparison must never cost a client its answer.
        failure_mode_allow=True,
        observability_mode=True,
        processing_mode=ProcessingMode(
            request_header_mode=Send.SKIP,
            response_header_mode=Send.SKIP,
            response_body_mode=Body.STREAMED,
            request_trailer_mode=Send.SKIP,
            response_trailer_mode=Send.SKIP,
        ),
        response_attributes=list(wire.RECORDER_ATTRIBUTES),
    )
    return HttpFilter(name=wire.SHADOW_RECORDER_FILTER, typed_config=_any(config), disabled=disabled)


def _recorder_on() -> AnyMessage:
    """Turn the (disabled by default) recorder on for one route."""
    per_route = ExtProcPerRoute(overrides=ExtProcOverrides(failure_mode_allow=True))
    return _any(FilterConfig(config=_any(per_route)))


def _mirror(model: Model) -> list[RouteActionRequestMirrorPolicy]:
    """The enriched request, copied to the shadow listener, tagged with the model it shadows."""
    if model.shadow is None:
        return []
    tag = HeaderMutation(
        append=HeaderValueOption(
            header=HeaderValue(key=wire.HEADER_SHADOW_OF, value=model.name),
            append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
        )
    )
    return [RouteActionRequestMirrorPolicy(cluster=wire.SHADOW_LISTENER, request_headers_mutations=[tag])]


def shadow_route_configuration(registry: Registry) -> RouteConfiguration:
    """Each shadowed model's mirrored requests to its shadow version."""
    routes = [
        Route(
            name=wire.SHADOW_ROUTE_PREFIX + model.name,
            match=RouteMatch(
                prefix="/",
                headers=[HeaderMatcher(name=wire.HEADER_SHADOW_OF, string_match=StringMatcher(exact=model.name))],
            ),
            route=RouteAction(
                cluster=wire.version_cluster(model.name, model.shadow.version), timeout=_ms(model.timeout_ms)
            ),
        )
        for model in _shadowed(registry)
        if model.shadow is not None
    ]
    return RouteConfiguration(
        name=SHADOW_ROUTES, virtual_hosts=[VirtualHost(name="shadow", domains=["*"], routes=routes)]
    )


def shadow_listener(registry: Registry, xds: XdsFiles | None = None) -> Listener:
    """An internal listener: mirrored requests go to each model's shadow version, answers to the recorder."""
    hcm = HttpConnectionManager(
        stat_prefix="shadow",
        http_filters=[
            shadow_recorder_filter(registry, disabled=False),
            HttpFilter(name="envoy.filters.http.router", typed_config=_any(Router())),
        ],
        # The mirrored request keeps the client request's id: that is how the answers are paired.
        preserve_external_request_id=True,
    )
    _routes(hcm, shadow_route_configuration(registry), xds)
    return Listener(
        name=wire.SHADOW_LISTENER,
        internal_listener=ListenerInternalListenerConfig(),
        filter_chains=[
            FilterChain(filters=[Filter(name="envoy.filters.network.http_connection_manager", typed_config=_any(hcm))])
        ],
    )


def shadow_cluster() -> Cluster:
    endpoint = LbEndpoint(
        endpoint=Endpoint(
            address=Address(envoy_internal_address=EnvoyInternalAddress(server_listener_name=wire.SHADOW_LISTENER))
        )
    )
    return Cluster(
        name=wire.SHADOW_LISTENER,
        type=ClusterDiscoveryType.STATIC,
        load_assignment=ClusterLoadAssignment(
            cluster_name=wire.SHADOW_LISTENER, endpoints=[LocalityLbEndpoints(lb_endpoints=[endpoint])]
        ),
    )
