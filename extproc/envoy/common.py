"""Names, placement and small message helpers shared by every Envoy config builder."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import betterproto2
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    ApiVersion,
    ConfigSource,
    HeaderValue,
    HeaderValueOption,
    HeaderValueOptionHeaderAppendAction,
    PathConfigSource,
    SocketAddress,
    WatchedDirectory,
)
from envoy_data_plane.envoy.config.route.v3 import (
    RouteConfiguration,
)
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    Rds,
)
from envoy_data_plane.google.protobuf import Any as AnyMessage

EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
# A second ext_proc instance for ensemble routes: same broker, a timeout covering the fan-out.
ENSEMBLE_EXT_PROC_FILTER = "model_broker.ensemble_ext_proc"
# The two again over ext_proc's `http_service` (`broker.transport`): off in the chain, switched on
# by the single-message routes, which then switch the gRPC ones off.
HTTP_EXT_PROC_FILTER = "model_broker.http_ext_proc"
HTTP_ENSEMBLE_EXT_PROC_FILTER = "model_broker.http_ensemble_ext_proc"
# A Lua filter before ext_proc holding an audited response until its record is spooled (`audit_hold`).
AUDIT_HOLD_FILTER = "model_broker.audit_hold"
RBAC_FILTER = "envoy.filters.http.rbac"
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
# How often every Envoy pushes its stats to the control plane (canary judgement granularity).
STATS_FLUSH_SECONDS = 1
SAGEMAKER_TARGET_VARIANT = "x-amzn-sagemaker-target-variant"
# Envoy 1.40 on Linux does not count `system_root_certs` as a trusted CA; the Debian/Ubuntu
# bundle (also in the envoyproxy/envoy image) is where the OS keeps them.
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# Local-reply mappers give Envoy's own replies the broker's JSON shape, but leave alone
# the broker's answers (details start with responses.DETAILS_PREFIX) and the generated
# direct responses, which already have it.
NOT_BROKER = "!(response.code_details.startsWith('model_broker_') || response.code_details == 'direct_response')"
JWT_FILTER = "envoy.filters.http.jwt_authn"
LUA_FILTER = "envoy.filters.http.lua"
# A second RBAC instance, before ext_proc: which consumer may call which route.
AUTHZ_FILTER = "model_broker.authorize"
# Its denials read `rbac_access_denied_matched_policy[model_broker_forbidden]`, which
# tells a 403 apart from the broker-approved gate's denials (a 400, empty body).
FORBIDDEN_POLICY = "model_broker_forbidden"
AUTHENTICATE_LUA = Path(__file__).with_name("authenticate.lua")
# Before authentication: per-address 429 for callers that keep failing it.
GUARD_FILTER = "model_broker.unauthenticated_guard"
UNAUTHENTICATED_LUA = Path(__file__).with_name("unauthenticated.lua")
TLS_SOCKET = "envoy.transport_sockets.tls"
# Rate-limit descriptor key of the consumer, filled from the auth metadata.
RATE_LIMIT_KEY = "consumer"
ADMIN_CLUSTER = "model_broker_admin"
# Read-only admin paths the stats listener forwards; everything else on the admin stays on loopback.
STATS_PATHS = ("/stats/prometheus", "/ready")
# Dynamic mode (`envoy-config --xds-dir`): the files Envoy watches, beside its bootstrap.
CLUSTERS_FILE = "clusters.yaml"
# Route configuration names, one per listener.
PUBLIC_ROUTES = "models"
EGRESS_ROUTES = "egress"
SHADOW_ROUTES = "shadow"
# Dynamic mode: the ensemble ext_proc timeout cannot follow the ensembles (it is in the
# listener), so it covers deadlines up to this; a longer deadline changes the bootstrap.
DYNAMIC_ENSEMBLE_DEADLINE_MS = 30_000


@dataclass(frozen=True, slots=True)
class Placement:
    """Where Envoy runs relative to the broker; the defaults are one machine (`up`, `demo`).

    On Kubernetes the broker's pods come and go behind a headless Service, so
    Envoy resolves `broker_host` by DNS (every pod, every worker port), and
    kubelet probes and Prometheus need the admin's read-only paths on a pod
    port while the admin itself stays on loopback. The control plane is one
    pod of its own there (`control_plane_host`, its Service), shared by every
    Envoy and broker pod.

    `broker_socket_dir`: Envoy and the broker share a host (`up`, `demo`), so the
    ext_proc clusters reach the workers' Unix sockets there (`wire.broker_socket`):
    no TCP stack on either side of the side call.
    """

    broker_host: str | None = None
    stats_port: int | None = None
    control_plane_host: str | None = None
    broker_socket_dir: str | None = None


@dataclass(frozen=True, slots=True)
class XdsFiles:
    """Dynamic mode: route configurations and model clusters come from files in `directory`.

    Listeners then depend only on the registry's base sections, so a new, changed
    or removed model or ensemble reaches a running Envoy by rewriting the files.
    """

    directory: str

    @staticmethod
    def routes_file(route_config_name: str) -> str:
        """One file per route configuration: Envoy's RDS takes exactly one resource per update."""
        return f"routes-{route_config_name}.yaml"

    def source(self, name: str) -> ConfigSource:
        """Envoy re-reads `name` whenever a file is moved into the directory (atomic rename)."""
        return ConfigSource(
            resource_api_version=ApiVersion.V3,
            path_config_source=PathConfigSource(
                path=str(Path(self.directory) / name), watched_directory=WatchedDirectory(path=self.directory)
            ),
        )


def _any(message: betterproto2.Message) -> AnyMessage:
    return AnyMessage.pack(message)


def _ms(milliseconds: int) -> timedelta:
    return timedelta(milliseconds=milliseconds)


def _socket(address: str, port: int) -> Address:
    return Address(socket_address=SocketAddress(address=address, port_value=port))


def _header(key: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(
        header=HeaderValue(key=key, value=value),
        append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _routes(hcm: HttpConnectionManager, routes: RouteConfiguration, xds: XdsFiles | None) -> HttpConnectionManager:
    """Inline routes, or (dynamic mode) the same route configuration by name from the routes file."""
    if xds is None:
        hcm.route_config = routes
    else:
        hcm.rds = Rds(config_source=xds.source(xds.routes_file(routes.name)), route_config_name=routes.name)
    return hcm
