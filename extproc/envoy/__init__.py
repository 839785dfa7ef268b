"""Envoy's configuration, generated from the registry with typed messages (envoy-data-plane).

One module per Envoy concept: `listeners` (public, egress, stats) and their filter
chains (`auth`, `ext_proc`, `local_replies`), `routes`, `clusters`, `shadow`, and
`bootstrap` assembling them; `xds_files` writes routes and clusters as files Envoy
watches (dynamic mode; import that module directly). Imports the registry and
`extproc.wire`, never the per-request core.
"""

from extproc.envoy.auth import (
    auth_filters,
    authentication_lua,
    jwks_cluster_name,
    jwt_filter,
    rate_limit_filter,
    retry_after_seconds,
)
from extproc.envoy.bootstrap import (
    bootstrap,
    bootstrap_dict,
    layered_runtime,
    render_yaml,
    route_configurations,
    stats_sink,
)
from extproc.envoy.clusters import (
    admin_cluster,
    control_plane_cluster,
    credential_provider,
    ext_proc_cluster,
    feedback_cluster,
    jwks_clusters,
    model_clusters,
    shared_path,
    version_cluster,
)
from extproc.envoy.common import (
    ADMIN_CLUSTER,
    AUTHENTICATE_LUA,
    AUTHZ_FILTER,
    CLUSTERS_FILE,
    DYNAMIC_ENSEMBLE_DEADLINE_MS,
    EGRESS_ROUTES,
    ENSEMBLE_EXT_PROC_FILTER,
    EXT_PROC_FILTER,
    FORBIDDEN_POLICY,
    HTTP_PROTOCOL_OPTIONS,
    JWT_FILTER,
    LUA_FILTER,
    NOT_BROKER,
    PUBLIC_ROUTES,
    RATE_LIMIT_KEY,
    RBAC_FILTER,
    SAGEMAKER_TARGET_VARIANT,
    SHADOW_ROUTES,
    STATS_FLUSH_SECONDS,
    STATS_PATHS,
    SYSTEM_CA_BUNDLE,
    TLS_SOCKET,
    Placement,
    XdsFiles,
)
from extproc.envoy.ext_proc import ensemble_ext_proc_filter, ext_proc_filter
from extproc.envoy.listeners import egress_listener, public_listener, stats_listener
from extproc.envoy.local_replies import local_reply_config
from extproc.envoy.routes import egress_route_configuration, route_configuration
from extproc.envoy.shadow import shadow_cluster, shadow_listener, shadow_recorder_filter, shadow_route_configuration

__all__ = [
    "ADMIN_CLUSTER",
    "AUTHENTICATE_LUA",
    "AUTHZ_FILTER",
    "CLUSTERS_FILE",
    "DYNAMIC_ENSEMBLE_DEADLINE_MS",
    "EGRESS_ROUTES",
    "ENSEMBLE_EXT_PROC_FILTER",
    "EXT_PROC_FILTER",
    "FORBIDDEN_POLICY",
    "HTTP_PROTOCOL_OPTIONS",
    "JWT_FILTER",
    "LUA_FILTER",
    "NOT_BROKER",
    "PUBLIC_ROUTES",
    "RATE_LIMIT_KEY",
    "RBAC_FILTER",
    "SAGEMAKER_TARGET_VARIANT",
    "SHADOW_ROUTES",
    "STATS_FLUSH_SECONDS",
    "STATS_PATHS",
    "SYSTEM_CA_BUNDLE",
    "TLS_SOCKET",
    "Placement",
    "XdsFiles",
    "admin_cluster",
    "auth_filters",
    "authentication_lua",
    "bootstrap",
    "bootstrap_dict",
    "control_plane_cluster",
    "credential_provider",
    "egress_listener",
    "egress_route_configuration",
    "ensemble_ext_proc_filter",
    "ext_proc_cluster",
    "ext_proc_filter",
    "feedback_cluster",
    "jwks_cluster_name",
    "jwks_clusters",
    "jwt_filter",
    "layered_runtime",
    "local_reply_config",
    "model_clusters",
    "public_listener",
    "rate_limit_filter",
    "render_yaml",
    "retry_after_seconds",
    "route_configuration",
    "route_configurations",
    "shadow_cluster",
    "shadow_listener",
    "shadow_recorder_filter",
    "shadow_route_configuration",
    "shared_path",
    "stats_listener",
    "stats_sink",
    "version_cluster",
]
