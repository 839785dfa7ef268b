"""The public, egress and stats listeners with their HTTP connection managers and filter chains."""

from __future__ import annotations

from envoy_data_plane.envoy.config.core.v3 import (
    DataSource,
    TransportSocket,
)
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.route.v3 import (
    DirectResponseAction,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)
from envoy_data_plane.envoy.extensions.filters.http.buffer.v3 import Buffer
from envoy_data_plane.envoy.extensions.filters.http.rbac.v3 import Rbac
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpFilter,
)
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CommonTlsContext,
    DownstreamTlsContext,
    TlsCertificate,
)

from extproc.envoy.audit_hold import audit_hold_filter
from extproc.envoy.auth import auth_filters
from extproc.envoy.common import ADMIN_CLUSTER, RBAC_FILTER, STATS_PATHS, TLS_SOCKET, XdsFiles, _any, _routes, _socket
from extproc.envoy.edge import limit_connections, protect, strip_identity_headers
from extproc.envoy.ext_proc import audits_any, ensemble_ext_proc_filter, ext_proc_filter, http_ext_proc_filters
from extproc.envoy.local_replies import local_reply_config
from extproc.envoy.routes import egress_route_configuration, route_configuration
from extproc.envoy.shadow import _shadowed, shadow_recorder_filter
from extproc.envoy.unanswered import unanswered_logs
from extproc.registry import (
    Registry,
)


def _downstream_tls(registry: Registry) -> TransportSocket | None:
    tls = registry.listener.tls
    if tls is None:
        return None
    certificate = TlsCertificate(
        certificate_chain=DataSource(filename=tls.certificate_chain),
        private_key=DataSource(filename=tls.private_key),
    )
    context = DownstreamTlsContext(
        common_tls_context=CommonTlsContext(tls_certificates=[certificate], alpn_protocols=["h2", "http/1.1"])
    )
    return TransportSocket(name=TLS_SOCKET, typed_config=_any(context))


def public_listener(registry: Registry, xds: XdsFiles | None = None) -> Listener:
    """In dynamic mode (`xds`) every optional filter is in the chain: routes switch them on."""
    limits = registry.limits
    dynamic = xds is not None
    hcm = HttpConnectionManager(
        stat_prefix="public",
        http_filters=[
            strip_identity_headers(),
            *auth_filters(registry),
            # Before ext_proc: on the way out it holds an audited response ext_proc has not released yet.
            *([audit_hold_filter()] if audits_any(registry, dynamic) else []),
            ext_proc_filter(registry, dynamic),
            *([ensemble_ext_proc_filter(registry, dynamic)] if registry.ensembles or dynamic else []),
            *http_ext_proc_filters(registry, dynamic),
            *([shadow_recorder_filter(registry, disabled=True)] if _shadowed(registry) or dynamic else []),
            HttpFilter(
                name="envoy.filters.http.buffer",
                typed_config=_any(Buffer(max_request_bytes=limits.max_body_bytes + limits.feature_headroom_bytes)),
            ),
            # After the buffer, so it runs once the broker has answered the body phase.
            HttpFilter(name=RBAC_FILTER, typed_config=_any(Rbac())),
            HttpFilter(name="envoy.filters.http.router", typed_config=_any(Router())),
        ],
        local_reply_config=local_reply_config(
            registry,
            oip=dynamic or any(m.protocol == "open_inference" for m in registry.models),
        ),
        access_log=unanswered_logs(registry, dynamic),
        # Clients are external: Envoy sets x-forwarded-for and its own x-request-id.
        use_remote_address=True,
        # The id in every error body and (later) audit record; clients quote it to support.
        always_set_request_id_in_response=True,
    )
    _routes(hcm, route_configuration(registry), xds)
    listener = _listener(
        "public", registry.listener.address, registry.listener.port, protect(hcm, registry), _downstream_tls(registry)
    )
    return limit_connections(listener, registry)


def _listener(
    name: str, address: str, port: int, hcm: HttpConnectionManager, tls: TransportSocket | None = None
) -> Listener:
    return Listener(
        name=name,
        address=_socket(address, port),
        filter_chains=[
            FilterChain(
                filters=[Filter(name="envoy.filters.network.http_connection_manager", typed_config=_any(hcm))],
                transport_socket=tls,
            )
        ],
    )


def egress_listener(registry: Registry, xds: XdsFiles | None = None) -> Listener:
    """Loopback only (the registry checks): the broker calls ensemble members here, enriched already."""
    hcm = HttpConnectionManager(
        stat_prefix="egress",
        # ext_proc is in the chain but off on every egress route: the seam where per-member
        # processing (audit of each member's answer) can be switched on by route.
        http_filters=[
            ext_proc_filter(registry, xds is not None),
            HttpFilter(name="envoy.filters.http.router", typed_config=_any(Router())),
        ],
        # Each member call gets its own x-request-id, returned so the broker can record it.
        always_set_request_id_in_response=True,
    )
    _routes(hcm, egress_route_configuration(registry), xds)
    return _listener("egress", registry.egress.address, registry.egress.port, hcm)


def stats_listener(registry: Registry, port: int) -> Listener:
    """Prometheus metrics and readiness from the admin, without exposing the admin itself."""
    routes = [Route(match=RouteMatch(path=path), route=RouteAction(cluster=ADMIN_CLUSTER)) for path in STATS_PATHS]
    routes.append(Route(match=RouteMatch(prefix="/"), direct_response=DirectResponseAction(status=404)))
    hcm = HttpConnectionManager(
        stat_prefix="stats",
        route_config=RouteConfiguration(
            name="stats", virtual_hosts=[VirtualHost(name="stats", domains=["*"], routes=routes)]
        ),
        http_filters=[HttpFilter(name="envoy.filters.http.router", typed_config=_any(Router()))],
    )
    return _listener("stats", registry.listener.address, port, hcm)
