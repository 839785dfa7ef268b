"""The whole Envoy bootstrap from the registry (static, or dynamic with watched files), and its YAML.

Filter chain on the public listener: [jwt_authn → authenticate (Lua) → authorize
(RBAC) → rate limit, when consumers are declared] → ext_proc (request body only,
buffered) → buffer (holds the request until the broker has answered; its limit is
the body limit) → rbac → router (weighted clusters per model). With ensembles, a
second ext_proc (longer timeout, enabled on ensemble routes only) and a loopback
egress listener the broker calls members through. See `envoy/README.md`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import yaml
from envoy_data_plane.envoy.config.bootstrap.v3 import (
    Admin,
    Bootstrap,
    BootstrapDynamicResources,
    BootstrapStaticResources,
    LayeredRuntime,
    RuntimeLayer,
    RuntimeLayerAdminLayer,
    RuntimeLayerRtdsLayer,
)
from envoy_data_plane.envoy.config.core.v3 import (
    GrpcService,
    GrpcServiceEnvoyGrpc,
    Node,
    TypedExtensionConfig,
)
from envoy_data_plane.envoy.config.metrics.v3 import StatsSink
from envoy_data_plane.envoy.config.route.v3 import (
    RouteConfiguration,
)
from envoy_data_plane.envoy.extensions.bootstrap.internal_listener.v3 import InternalListener
from envoy_data_plane.envoy.extensions.stat_sinks.open_telemetry.v3 import SinkConfig

from extproc import wire
from extproc.envoy.clusters import (
    _control_plane_source,
    admin_cluster,
    control_plane_cluster,
    ext_proc_cluster,
    ext_proc_http_cluster,
    feedback_cluster,
    jwks_clusters,
    model_clusters,
)
from extproc.envoy.common import CLUSTERS_FILE, STATS_FLUSH_SECONDS, Placement, XdsFiles, _any, _socket
from extproc.envoy.edge import overload_manager
from extproc.envoy.ext_proc import over_http
from extproc.envoy.listeners import egress_listener, public_listener, stats_listener
from extproc.envoy.retry_hop import retry_cluster, retry_listener
from extproc.envoy.routes import egress_route_configuration, route_configuration
from extproc.envoy.shadow import _shadowed, shadow_cluster, shadow_listener, shadow_route_configuration
from extproc.registry import (
    Registry,
)

# Envoy, broker and control plane on one host: the default placement.
SAME_HOST = Placement()


def layered_runtime() -> LayeredRuntime:
    """The live weights layer from the control plane, and the admin layer for break-glass edits."""
    return LayeredRuntime(
        layers=[
            RuntimeLayer(
                name=wire.RUNTIME_LAYER,
                rtds_layer=RuntimeLayerRtdsLayer(name=wire.RUNTIME_LAYER, rtds_config=_control_plane_source()),
            ),
            RuntimeLayer(name="admin", admin_layer=RuntimeLayerAdminLayer()),
        ]
    )


def stats_sink() -> StatsSink:
    """Every Envoy pushes its stats (deltas) to the control plane, which judges canaries from
    the per-cluster counters: rollback costs the request path nothing."""
    sink = SinkConfig(
        grpc_service=GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=wire.CONTROL_PLANE_CLUSTER)),
        report_counters_as_deltas=True,
        report_histograms_as_deltas=True,
        # `cluster.upstream_rq_xx` with the cluster and status class as attributes.
        use_tag_extracted_name=True,
        emit_tags_as_attributes=True,
    )
    return StatsSink(name="envoy.stat_sinks.open_telemetry", typed_config=_any(sink))


def internal_listeners() -> TypedExtensionConfig:
    """Envoy's in-process listeners (the shadow listener, the `http_service` retry hop)."""
    return TypedExtensionConfig(name="envoy.bootstrap.internal_listener", typed_config=_any(InternalListener()))


def route_configurations(registry: Registry) -> list[RouteConfiguration]:
    """Dynamic mode: every listener's routes (the routes file), empty ones included."""
    return [route_configuration(registry), egress_route_configuration(registry), shadow_route_configuration(registry)]


def bootstrap(
    registry: Registry, workers: int | None = None, placement: Placement = SAME_HOST, xds: XdsFiles | None = None
) -> Bootstrap:
    """Static by default; with `xds`, routes and model clusters come from files (`xds_files`)."""
    count = workers or registry.broker.workers
    dynamic = xds is not None
    listeners = [public_listener(registry, xds)]
    if registry.needs_egress or dynamic:
        listeners.append(egress_listener(registry, xds))
    clusters = [ext_proc_cluster(registry, count, placement.broker_host, placement.broker_socket_dir)]
    internal = False
    if over_http(registry):
        clusters.append(ext_proc_http_cluster(registry, count, placement.broker_host, placement.broker_socket_dir))
    if over_http(registry) and registry.broker.retry_unanswered:
        listeners.append(retry_listener())
        clusters.append(retry_cluster())
        internal = True
    clusters.append(control_plane_cluster(registry, placement.control_plane_host))
    if registry.takes_feedback or dynamic:  # dynamic: a reloaded file may add the route
        clusters.append(feedback_cluster(registry, placement.control_plane_host))
    if xds is None:
        clusters += model_clusters(registry)
    clusters += jwks_clusters(registry)
    if placement.stats_port is not None:
        listeners.append(stats_listener(registry, placement.stats_port))
        clusters.append(admin_cluster(registry))
    if _shadowed(registry) or dynamic:
        listeners.append(shadow_listener(registry, xds))
        clusters.append(shadow_cluster())
        internal = True
    extensions = [internal_listeners()] if internal else []
    return Bootstrap(
        # xDS subscriptions need a node identity; `--service-node` overrides the id per replica.
        node=Node(id="model-broker-envoy", cluster="model-broker"),
        admin=Admin(address=_socket(registry.admin.address, registry.admin.port)),
        static_resources=BootstrapStaticResources(listeners=listeners, clusters=clusters),
        dynamic_resources=BootstrapDynamicResources(cds_config=xds.source(CLUSTERS_FILE)) if xds else None,
        bootstrap_extensions=extensions,
        layered_runtime=layered_runtime(),
        stats_sinks=[stats_sink()],
        stats_flush_interval=timedelta(seconds=STATS_FLUSH_SECONDS),
        overload_manager=overload_manager(registry),
    )


def bootstrap_dict(
    registry: Registry, workers: int | None = None, placement: Placement = SAME_HOST, xds: XdsFiles | None = None
) -> dict[str, Any]:
    doc: dict[str, Any] = bootstrap(registry, workers, placement, xds).to_dict()
    return doc


def render_yaml(registry: Registry, workers: int | None = None, placement: Placement = SAME_HOST) -> str:
    return yaml.safe_dump(bootstrap_dict(registry, workers, placement), sort_keys=False)
