"""The Envoy bootstrap, generated from the registry with typed messages (envoy-data-plane).

Filter chain on the public listener: [jwt_authn → authenticate (Lua) → authorize
(RBAC) → rate limit, when consumers are declared] → ext_proc (request body only,
buffered) → buffer (holds the request until the broker has answered; its limit is
the body limit) → rbac → router (weighted clusters per model). With ensembles, a
second ext_proc (longer timeout, enabled on ensemble routes only) and a loopback
egress listener the broker calls members through. See `envoy/README.md`.
"""

from __future__ import annotations

import ipaddress
import json
import math
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import betterproto2
import yaml
from envoy_data_plane.envoy.config.accesslog.v3 import (
    AccessLogFilter,
    ExtensionFilter,
)
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
from envoy_data_plane.envoy.config.cluster.v3 import (
    Cluster,
    ClusterDiscoveryType,
    ClusterDnsLookupFamily,
    ClusterLbPolicy,
)
from envoy_data_plane.envoy.config.common.mutation_rules.v3 import HeaderMutation
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    ApiConfigSource,
    ApiConfigSourceApiType,
    ApiVersion,
    ConfigSource,
    DataSource,
    EnvoyInternalAddress,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HeaderValue,
    HeaderValueOption,
    HeaderValueOptionHeaderAppendAction,
    Http1ProtocolOptions,
    Http2ProtocolOptions,
    HttpUri,
    Metadata,
    Node,
    PathConfigSource,
    RuntimeFractionalPercent,
    SocketAddress,
    SubstitutionFormatString,
    TransportSocket,
    TypedExtensionConfig,
    WatchedDirectory,
)
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener, ListenerInternalListenerConfig
from envoy_data_plane.envoy.config.metrics.v3 import StatsSink
from envoy_data_plane.envoy.config.rbac.v3 import (
    Permission,
    Policy,
    Principal,
    PrincipalSet,
    RbacAction,
    SourcedMetadata,
)
from envoy_data_plane.envoy.config.rbac.v3 import Rbac as Rules
from envoy_data_plane.envoy.config.route.v3 import (
    DirectResponseAction,
    FilterConfig,
    HeaderMatcher,
    RateLimitAction,
    RateLimitActionMetaData,
    RateLimitActionMetaDataSource,
    Route,
    RouteAction,
    RouteActionHashPolicy,
    RouteActionHashPolicyHeader,
    RouteActionRequestMirrorPolicy,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
    WeightedCluster,
    WeightedClusterClusterWeight,
)
from envoy_data_plane.envoy.config.route.v3 import (
    RateLimit as RateLimitConfig,
)
from envoy_data_plane.envoy.extensions.access_loggers.filters.cel.v3 import ExpressionFilter
from envoy_data_plane.envoy.extensions.bootstrap.internal_listener.v3 import InternalListener
from envoy_data_plane.envoy.extensions.common.aws.v3 import (
    AwsCredentialProvider,
    ContainerCredentialProvider,
    CredentialsFileCredentialProvider,
    EnvironmentCredentialProvider,
    InstanceProfileCredentialProvider,
)
from envoy_data_plane.envoy.extensions.common.ratelimit.v3 import (
    LocalRateLimitDescriptor,
    RateLimitDescriptorEntry,
    XRateLimitHeadersRfcVersion,
)
from envoy_data_plane.envoy.extensions.filters.http.aws_request_signing.v3 import AwsRequestSigning
from envoy_data_plane.envoy.extensions.filters.http.buffer.v3 import Buffer
from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import (
    ExternalProcessor,
    ExtProcOverrides,
    ExtProcPerRoute,
    MetadataOptions,
    MetadataOptionsMetadataNamespaces,
    ProcessingMode,
)
from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import ProcessingModeBodySendMode as Body
from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import ProcessingModeHeaderSendMode as Send
from envoy_data_plane.envoy.extensions.filters.http.jwt_authn.v3 import (
    JwksAsyncFetch,
    JwtAuthentication,
    JwtProvider,
    JwtRequirement,
    JwtRequirementOrList,
    PerRouteConfig,
    RemoteJwks,
    RequirementRule,
)
from envoy_data_plane.envoy.extensions.filters.http.local_ratelimit.v3 import LocalRateLimit
from envoy_data_plane.envoy.extensions.filters.http.lua.v3 import Lua, LuaPerRoute
from envoy_data_plane.envoy.extensions.filters.http.rbac.v3 import Rbac, RbacPerRoute
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.http.upstream_codec.v3 import UpstreamCodec
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpFilter,
    LocalReplyConfig,
    Rds,
    ResponseMapper,
)
from envoy_data_plane.envoy.extensions.stat_sinks.open_telemetry.v3 import SinkConfig
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CommonTlsContext,
    DownstreamTlsContext,
    SubjectAltNameMatcher,
    SubjectAltNameMatcherSanType,
    TlsCertificate,
    UpstreamTlsContext,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.envoy.type.matcher.v3 import (
    MetadataMatcher,
    MetadataMatcherPathSegment,
    RegexMatchAndSubstitute,
    RegexMatcher,
    StringMatcher,
    ValueMatcher,
)
from envoy_data_plane.envoy.type.metadata.v3 import MetadataKey, MetadataKeyPathSegment
from envoy_data_plane.envoy.type.v3 import (
    FractionalPercent,
    FractionalPercentDenominatorType,
    HttpStatus,
    StatusCode,
    TokenBucket,
)
from envoy_data_plane.google.protobuf import Any as AnyMessage
from envoy_data_plane.google.protobuf import Empty, Struct

from extproc.core import wire
from extproc.registry import (
    Consumer,
    Ensemble,
    Model,
    RateLimit,
    Registry,
    SageMakerBackend,
    ServiceBackend,
    Version,
)

EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
# A second ext_proc instance for ensemble routes: same broker, a timeout covering the fan-out.
ENSEMBLE_EXT_PROC_FILTER = "model_broker.ensemble_ext_proc"
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
TLS_SOCKET = "envoy.transport_sockets.tls"
# Rate-limit descriptor key of the consumer, filled from the auth metadata.
RATE_LIMIT_KEY = "consumer"
ADMIN_CLUSTER = "model_broker_admin"
# Read-only admin paths the stats listener forwards; everything else on the admin stays on loopback.
STATS_PATHS = ("/stats/prometheus", "/ready")
# Dynamic mode (`envoy-config --xds-dir`): the files Envoy watches, beside its bootstrap.
CLUSTERS_FILE = "clusters.yaml"
# Route configuration names, one per listener.
PUBLIC_ROUTES, EGRESS_ROUTES, SHADOW_ROUTES = "models", "egress", "shadow"
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
    """

    broker_host: str | None = None
    stats_port: int | None = None
    control_plane_host: str | None = None


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


def _error_json(code: str, message: str) -> SubstitutionFormatString:
    """Envoy-side errors in the broker's error shape, with Envoy's own request id."""
    error = {"code": code, "message": message, "request_id": "%REQ(X-REQUEST-ID)%"}
    return SubstitutionFormatString(json_format=Struct.from_dict({"error": error}), content_type="application/json")


def _direct(status: int, code: str, message: str) -> DirectResponseAction:
    return DirectResponseAction(status=status, body_format=_error_json(code, message))


def _cel(expression: str) -> AccessLogFilter:
    return AccessLogFilter(
        extension_filter=ExtensionFilter(
            name="envoy.access_loggers.extension_filters.cel",
            typed_config=_any(ExpressionFilter(expression=expression)),
        )
    )


def _mapper(condition: str, status: int, code: str, message: str) -> ResponseMapper:
    return ResponseMapper(
        filter=_cel(f"{NOT_BROKER} && ({condition})"),
        status_code=status,
        body_format_override=_error_json(code, message),
    )


def _auth_mappers() -> list[ResponseMapper]:
    """401/403/429 from the authentication, authorization and rate-limit filters."""
    too_many = _mapper(
        "response.code_details == 'local_rate_limited'",
        429,
        "rate_limited",
        "too many requests for this consumer; retry after the number of seconds in retry-after",
    )
    # Per consumer, set by the authentication filter: the rate-limit filter's own
    # x-ratelimit-reset is added after local_reply_config runs, so it cannot be copied.
    retry_after = f"%DYNAMIC_METADATA({wire.AUTH_NAMESPACE}:{wire.META_RETRY_AFTER})%"
    too_many.headers_to_add = [_header("retry-after", retry_after)]
    return [
        _mapper(
            # jwt_authn answers a token for another audience with 403: still not authenticated here.
            "response.code == 401 || response.code_details.startsWith('jwt_authn_access_denied')",
            401,
            "unauthenticated",
            f"send a valid API key in {wire.HEADER_API_KEY} or a valid bearer token in authorization",
        ),
        _mapper(
            f"response.code_details == 'rbac_access_denied_matched_policy[{FORBIDDEN_POLICY}]'",
            403,
            "forbidden",
            "this consumer may not call this route",
        ),
        too_many,
    ]


def local_reply_config(auth: bool = False) -> LocalReplyConfig:
    """Envoy's own replies (body too large, broker down, model down) as JSON, details hidden."""
    return LocalReplyConfig(
        mappers=[
            *(_auth_mappers() if auth else []),
            _mapper("response.code == 413", 413, "body_too_large", "the request body is too large"),
            _mapper(
                "response.code_details.startsWith('rbac_access_denied')",
                400,
                "invalid_json",
                "the request body is empty; send a JSON object",
            ),
            _mapper(
                "response.code_details.startsWith('ext_proc')",
                503,
                "broker_unavailable",
                "the model broker is unavailable; try again shortly",
            ),
            _mapper(
                "response.code == 504",
                504,
                "upstream_timeout",
                "the model did not answer in time",
            ),
            _mapper(
                "response.code >= 500",
                503,
                "upstream_unavailable",
                "the model is unavailable; try again shortly",
            ),
            _mapper("response.code >= 400", 400, "bad_request", "the request could not be processed"),
        ]
    )


def ext_proc_filter(registry: Registry, dynamic: bool = False) -> HttpFilter:
    config = _ext_proc(registry, registry.broker.message_timeout_ms, dynamic)
    return HttpFilter(name=EXT_PROC_FILTER, typed_config=_any(config))


def ensemble_ext_proc_filter(registry: Registry, dynamic: bool = False) -> HttpFilter:
    """Off in the chain, on per ensemble route: the model routes keep their short message timeout.

    The broker answers an ensemble by its deadline at the latest; the message
    timeout adds the broker's own budget on top, so Envoy never cuts it short.
    """
    deadlines = [e.deadline_ms for e in registry.ensembles]
    if dynamic:
        deadlines.append(DYNAMIC_ENSEMBLE_DEADLINE_MS)
    config = _ext_proc(registry, max(deadlines) + registry.broker.message_timeout_ms, dynamic)
    config.stat_prefix = "ensemble"
    return HttpFilter(name=ENSEMBLE_EXT_PROC_FILTER, typed_config=_any(config), disabled=True)


def _ext_proc(registry: Registry, timeout_ms: int, dynamic: bool) -> ExternalProcessor:
    # Dynamic mode: any model may become audited without a new listener.
    audited = registry.audit is not None if dynamic else any(registry.audited(m) for m in registry.models)
    return ExternalProcessor(
        grpc_service=GrpcService(
            envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=wire.EXT_PROC_CLUSTER),
            timeout=_ms(timeout_ms),
        ),
        # Fail closed: a request the broker never saw must not reach a model unenriched.
        failure_mode_allow=False,
        # One message per request: the buffered body. Header and response phases
        # are asked for per route, only where a feature needs them.
        processing_mode=_body_mode(response_headers=Send.SKIP, response_body=Body.NONE),
        message_timeout=_ms(timeout_ms),
        request_attributes=list(wire.REQUEST_ATTRIBUTES),
        # Read on audited routes only (the only ones with a response phase).
        response_attributes=list(wire.RESPONSE_ATTRIBUTES) if audited else [],
        metadata_options=MetadataOptions(
            receiving_namespaces=MetadataOptionsMetadataNamespaces(untyped=[wire.METADATA_NAMESPACE]),
            # The verified consumer, for the request context (audit, metrics).
            forwarding_namespaces=(
                MetadataOptionsMetadataNamespaces(untyped=[wire.AUTH_NAMESPACE]) if registry.consumers else None
            ),
        ),
        status_on_error=HttpStatus(code=StatusCode.ServiceUnavailable),
    )


def _header_phase_only() -> dict[str, AnyMessage]:
    """The broker's own GET routes: headers to the broker, which answers immediately."""
    per_route = ExtProcPerRoute(
        overrides=ExtProcOverrides(
            processing_mode=ProcessingMode(
                request_header_mode=Send.SEND, request_body_mode=Body.NONE, response_header_mode=Send.SKIP
            )
        )
    )
    return {EXT_PROC_FILTER: _any(per_route)}


def _body_mode(response_headers: Send, response_body: Body) -> ProcessingMode:
    """The buffered request body (the hot path) and the given response phases; no trailers."""
    return ProcessingMode(
        request_header_mode=Send.SKIP,
        request_body_mode=Body.BUFFERED,
        response_header_mode=response_headers,
        response_body_mode=response_body,
        request_trailer_mode=Send.SKIP,
        response_trailer_mode=Send.SKIP,
    )


def _model_phases(model: Model, audited: bool) -> AnyMessage | None:
    """The broker phases of a model route beyond the request body, or None (the hot path).

    An override replaces the whole processing mode, so every field is spelled out.
    Audited routes add the response headers and body. The response header phase is
    on although the broker only reads attributes there: with it skipped, Envoy 1.40
    sends the headers downstream before the buffered body is answered (measured), and
    the status would leave before the audit record is spooled. Sticky-by-body routes
    add the request header phase: Envoy drops the body phase's header mutation otherwise.
    """
    sticky = model.sticky is not None and model.sticky.body_field is not None
    if not (audited or sticky):
        return None
    if audited:
        mode = _body_mode(response_headers=Send.SEND, response_body=Body.BUFFERED)
    else:
        mode = _body_mode(response_headers=Send.SKIP, response_body=Body.NONE)
    if sticky:
        mode.request_header_mode = Send.SEND
    return _any(ExtProcPerRoute(overrides=ExtProcOverrides(processing_mode=mode)))


def _hash_policy(model: Model) -> list[RouteActionHashPolicy]:
    """The header Envoy hashes to pick a version of a sticky model: the client's own (`sticky.header`),
    or the one the broker sets from the body (`sticky.body_field`)."""
    if model.sticky is None:
        return []
    header = model.sticky.header or wire.HEADER_STICKY_KEY
    return [RouteActionHashPolicy(header=RouteActionHashPolicyHeader(header_name=header))]


def _model_filters(model: Model, audited: bool) -> dict[str, AnyMessage]:
    """Per-route filter settings of the public model route: broker phases, shadow recording."""
    filters: dict[str, AnyMessage] = {}
    phases = _model_phases(model, audited)
    if phases is not None:
        filters[EXT_PROC_FILTER] = phases
    if model.shadow is not None:
        filters[wire.SHADOW_RECORDER_FILTER] = _recorder_on()
    return filters


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


def _routes(hcm: HttpConnectionManager, routes: RouteConfiguration, xds: XdsFiles | None) -> HttpConnectionManager:
    """Inline routes, or (dynamic mode) the same route configuration by name from the routes file."""
    if xds is None:
        hcm.route_config = routes
    else:
        hcm.rds = Rds(config_source=xds.source(xds.routes_file(routes.name)), route_config_name=routes.name)
    return hcm


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


def _without_broker() -> dict[str, AnyMessage]:
    """Routes Envoy answers alone (unknown path, wrong method) never cost a broker call."""
    return {EXT_PROC_FILTER: _any(ExtProcPerRoute(disabled=True))}


def _body_only() -> ExtProcPerRoute:
    """The filter's own mode, restated: Envoy needs a config to switch a chain-disabled filter on."""
    mode = _body_mode(response_headers=Send.SKIP, response_body=Body.NONE)
    return ExtProcPerRoute(overrides=ExtProcOverrides(processing_mode=mode))


def _broker_route(name: str, path: str) -> Route:
    return Route(
        name=name,
        match=RouteMatch(path=path),
        # Reached only if the broker let the request through, which it never does here.
        direct_response=_direct(503, "broker_unavailable", "the model broker did not answer"),
        typed_per_filter_config=_header_phase_only(),
    )


def _broker_approved() -> RbacPerRoute:
    """Let a model request through only if the broker answered its body phase.

    A request with no body never reaches ext_proc's body phase; without this
    gate it would reach the model unenriched.
    """
    stamp = MetadataMatcher(
        filter=wire.METADATA_NAMESPACE,
        path=[MetadataMatcherPathSegment(key=wire.META_APPROVED)],
        value=ValueMatcher(present_match=True),
    )
    policy = Policy(
        permissions=[Permission(any=True)],
        principals=[Principal(sourced_metadata=SourcedMetadata(metadata_matcher=stamp))],
    )
    return RbacPerRoute(rbac=Rbac(rules=Rules(action=RbacAction.ALLOW, policies={"broker-approved": policy})))


def _post(path: str) -> RouteMatch:
    return RouteMatch(path=path, headers=[HeaderMatcher(name=":method", string_match=StringMatcher(exact="POST"))])


def _model_action(model: Model) -> RouteAction:
    """Weighted split over the versions: the same on the public route and the egress route."""
    weighted = WeightedCluster(
        clusters=[
            WeightedClusterClusterWeight(
                name=wire.version_cluster(model.name, v.name),
                weight=v.weight,
                request_headers_to_add=_target_variant(v),
            )
            for v in model.versions
        ],
        # Live weights: Envoy reads `<prefix>.<cluster>` from the runtime layer the control
        # plane pushes (RTDS); the registry's weight is the default until it has.
        runtime_key_prefix=wire.RUNTIME_WEIGHTS_PREFIX,
        # Sticky A/B: the hash of the route's hash policy picks the version, not a random number.
        use_hash_policy=True if model.sticky is not None else None,
    )
    return RouteAction(
        weighted_clusters=weighted,
        hash_policy=_hash_policy(model),
        timeout=_ms(model.timeout_ms),
        # One path for all versions: rewrite on the route; else each cluster rewrites its own.
        regex_rewrite=_rewrite_to(path) if (path := shared_path(model)) else None,
    )


def _version_header() -> HeaderValueOption:
    # From the metadata of the upstream host that answered: absent when no model did.
    return _header(wire.HEADER_VERSION, f"%UPSTREAM_METADATA({wire.METADATA_NAMESPACE}:{wire.META_VERSION})%")


def _wrong_method(name: str, path: str) -> Route:
    return Route(
        name=f"{name}:method",
        match=RouteMatch(path=path),
        direct_response=_direct(405, "method_not_allowed", f"{path} accepts POST only"),
        typed_per_filter_config=_without_broker(),
        response_headers_to_add=[_header("allow", "POST")],
    )


def _model_routes(model: Model, audited: bool) -> list[Route]:
    metadata = f"%DYNAMIC_METADATA({wire.METADATA_NAMESPACE}:{{}})%"
    action = _model_action(model)
    # Mirrored from the public route only: ensemble member calls are not shadowed.
    action.request_mirror_policies = _mirror(model)
    served = Route(
        name=model.name,
        match=_post(model.path),
        typed_per_filter_config={RBAC_FILTER: _any(_broker_approved()), **_model_filters(model, audited)},
        route=action,
        response_headers_to_add=[
            _header(wire.HEADER_MODEL, model.name),
            _version_header(),
            _header(wire.HEADER_SERVER_TIMING, metadata.format(wire.META_SERVER_TIMING)),
            _header(wire.HEADER_DEGRADED, metadata.format(wire.META_DEGRADED)),
        ],
    )
    return [served, _wrong_method(model.name, model.path)]


def _ensemble_routes(ensemble: Ensemble) -> list[Route]:
    """The body goes to the broker (through the ensemble ext_proc), which always answers it itself."""
    name = wire.ensemble_route(ensemble.name)
    served = Route(
        name=name,
        match=_post(ensemble.path),
        # Reached only if the broker let the request through, which it never does here.
        direct_response=_direct(503, "broker_unavailable", "the model broker did not answer"),
        typed_per_filter_config={
            EXT_PROC_FILTER: _any(ExtProcPerRoute(disabled=True)),
            ENSEMBLE_EXT_PROC_FILTER: _any(FilterConfig(config=_any(_body_only()), disabled=False)),
            # A POST without a body never reaches ext_proc: 400, as on model routes.
            RBAC_FILTER: _any(_broker_approved()),
        },
    )
    return [served, _wrong_method(name, ensemble.path)]


def _egress_routes(registry: Registry) -> list[Route]:
    """One route per member model: the model's split, path rewrite and signing, without the broker."""
    members = dict.fromkeys(m.model for e in registry.ensembles for m in e.members)
    routes = []
    for name in members:
        model = registry.model(name)
        assert model is not None  # the registry guarantees members are models
        routes.append(
            Route(
                name=wire.egress_route(model.name),
                match=_post(model.path),
                route=_model_action(model),
                # The body was enriched before the call; a per-member audit can enable its phase here.
                typed_per_filter_config=_without_broker(),
                response_headers_to_add=[_version_header()],
            )
        )
    return routes


def _target_variant(version: Version) -> list[HeaderValueOption]:
    """SageMaker's production-variant pin; added on the route, so the upstream signer covers it."""
    sagemaker = version.backend.sagemaker
    if sagemaker is None or sagemaker.target_variant is None:
        return []
    return [_header(SAGEMAKER_TARGET_VARIANT, sagemaker.target_variant)]


def _rewrite_to(path: str) -> RegexMatchAndSubstitute:
    return RegexMatchAndSubstitute(pattern=RegexMatcher(regex="^.*$"), substitution=path)


def route_configuration(registry: Registry) -> RouteConfiguration:
    routes = [_broker_route(wire.ROUTE_HEALTHZ, wire.PATH_HEALTHZ)]
    if registry.admin_endpoints_public:
        routes.append(_broker_route(wire.ROUTE_MODELS, wire.PATH_MODELS))
    for model in registry.models:
        routes += _model_routes(model, registry.audited(model))
    for ensemble in registry.ensembles:
        routes += _ensemble_routes(ensemble)
    routes.append(_unknown_route())
    if registry.consumers:
        _authorize_routes(routes, registry)
    return RouteConfiguration(
        name=PUBLIC_ROUTES,
        virtual_hosts=[VirtualHost(name="models", domains=["*"], routes=routes)],
    )


def _consumer_is(name: str) -> Principal:
    verified = MetadataMatcher(
        filter=wire.AUTH_NAMESPACE,
        path=[MetadataMatcherPathSegment(key=wire.META_CONSUMER)],
        value=ValueMatcher(string_match=StringMatcher(exact=name)),
    )
    return Principal(sourced_metadata=SourcedMetadata(metadata_matcher=verified))


def _only_consumers(allowed: list[str]) -> RbacPerRoute:
    """Deny (by the named policy, so the reply maps to 403) every consumer not in `allowed`."""
    outsider = (
        Principal(not_id=Principal(or_ids=PrincipalSet(ids=[_consumer_is(n) for n in allowed])))
        if allowed
        else Principal(any=True)
    )
    policy = Policy(permissions=[Permission(any=True)], principals=[outsider])
    return RbacPerRoute(rbac=Rbac(rules=Rules(action=RbacAction.DENY, policies={FORBIDDEN_POLICY: policy})))


def _authorize_routes(routes: list[Route], registry: Registry) -> None:
    """Per route: who may call it (allow-lists name models and ensembles); /healthz stays open for probes."""
    allowed = {
        route: [c.name for c in registry.consumers if c.may_call(name)] for name, route in registry.route_names()
    }
    allowed[wire.ROUTE_MODELS] = [c.name for c in registry.consumers if c.admin]
    for route in routes:
        if route.name == wire.ROUTE_HEALTHZ:
            route.typed_per_filter_config[JWT_FILTER] = _any(PerRouteConfig(disabled=True))
            route.typed_per_filter_config[LUA_FILTER] = _any(LuaPerRoute(disabled=True))
        elif route.name in allowed:
            route.typed_per_filter_config[AUTHZ_FILTER] = _any(_only_consumers(allowed[route.name]))


def _lua_string(value: str) -> str:
    """A Lua string literal; the registry's patterns keep names and hashes plain ASCII."""
    return json.dumps(value, ensure_ascii=True)


def authentication_lua(registry: Registry) -> str:
    """The Lua authentication filter: `authenticate.lua` behind the registry's tables."""
    keys = {h.removeprefix("sha256:"): c.name for c in registry.consumers for h in c.api_keys}
    names = [c.name for c in registry.consumers if c.jwt is not None]
    settings = {
        "NAMESPACE": wire.AUTH_NAMESPACE,
        "CONSUMER_KEY": wire.META_CONSUMER,
        "RETRY_AFTER_KEY": wire.META_RETRY_AFTER,
        "JWT_NAMESPACE": wire.JWT_AUTHN_NAMESPACE,
        "HEADER_API_KEY": wire.HEADER_API_KEY,
        "HEADER_CONSUMER": wire.HEADER_CONSUMER,
        "WWW_AUTHENTICATE": f'Bearer, ApiKey header="{wire.HEADER_API_KEY}"',
    }
    lines = [f"local {name} = {_lua_string(value)}" for name, value in settings.items()]
    lines.append(
        "local API_KEYS = {" + ", ".join(f"[{_lua_string(h)}] = {_lua_string(n)}" for h, n in keys.items()) + "}"
    )
    lines.append("local JWT_NAMES = {" + ", ".join(map(_lua_string, names)) + "}")
    retry = {c.name: str(retry_after_seconds(c.rate_limit)) for c in registry.consumers if c.rate_limit is not None}
    lines.append(
        "local RETRY_AFTER = {" + ", ".join(f"[{_lua_string(n)}] = {_lua_string(s)}" for n, s in retry.items()) + "}"
    )
    return "\n".join(lines) + "\n" + AUTHENTICATE_LUA.read_text(encoding="utf-8")


def retry_after_seconds(limit: RateLimit) -> int:
    """Whole seconds until an empty bucket holds one token again (Envoy refills continuously)."""
    return max(1, math.ceil(limit.seconds / limit.requests))


def jwks_cluster_name(uri: str) -> str:
    parts = urlsplit(uri)
    return f"jwks--{parts.hostname}--{parts.port or (443 if parts.scheme == 'https' else 80)}"


def _jwt_provider(consumer: Consumer) -> JwtProvider:
    jwt = consumer.jwt
    assert jwt is not None  # only consumers with a jwt credential get a provider
    provider = JwtProvider(
        issuer=jwt.issuer,
        audiences=list(jwt.audiences),
        # The payload lands under the consumer's name: the Lua filter reads who was verified.
        payload_in_metadata=consumer.name,
    )
    if jwt.subject is not None:
        provider.subjects = StringMatcher(exact=jwt.subject)
    if jwt.jwks_file is not None:
        provider.local_jwks = DataSource(filename=jwt.jwks_file)
    else:
        assert jwt.jwks_uri is not None  # the registry guarantees one JWKS source
        provider.remote_jwks = RemoteJwks(
            http_uri=HttpUri(uri=jwt.jwks_uri, cluster=jwks_cluster_name(jwt.jwks_uri), timeout=_ms(2000)),
            cache_duration=timedelta(minutes=10),
            # Fetched at start and refreshed in the background, never on a request's path.
            async_fetch=JwksAsyncFetch(),
        )
    return provider


def jwt_filter(registry: Registry) -> HttpFilter:
    """Verify bearer tokens of every JWT consumer; a request without one goes on to the API-key check."""
    providers = {c.name: _jwt_provider(c) for c in registry.consumers if c.jwt is not None}
    # A token that is presented must verify (else 401 here); a missing one is left to the Lua filter.
    alternatives = [JwtRequirement(provider_name=name) for name in providers]
    alternatives.append(JwtRequirement(allow_missing=Empty()))
    config = JwtAuthentication(
        providers=providers,
        rules=[
            RequirementRule(
                match=RouteMatch(prefix="/"),
                requires=JwtRequirement(requires_any=JwtRequirementOrList(requirements=alternatives)),
            )
        ],
    )
    return HttpFilter(name=JWT_FILTER, typed_config=_any(config))


def _all_of_the_time() -> RuntimeFractionalPercent:
    return RuntimeFractionalPercent(
        default_value=FractionalPercent(numerator=100, denominator=FractionalPercentDenominatorType.HUNDRED)
    )


def rate_limit_filter(consumers: list[Consumer]) -> HttpFilter:
    """One token bucket per consumer, keyed by the verified consumer name (local to this Envoy)."""
    consumer = RateLimitActionMetaData(
        descriptor_key=RATE_LIMIT_KEY,
        metadata_key=MetadataKey(key=wire.AUTH_NAMESPACE, path=[MetadataKeyPathSegment(key=wire.META_CONSUMER)]),
        source=RateLimitActionMetaDataSource.DYNAMIC,
        skip_if_absent=True,
    )
    descriptors = []
    for c in consumers:
        assert c.rate_limit is not None  # the caller passes limited consumers only
        limit = c.rate_limit
        bucket = TokenBucket(
            max_tokens=limit.burst or limit.requests,
            tokens_per_fill=limit.requests,
            fill_interval=timedelta(seconds=limit.seconds),
        )
        entries = [RateLimitDescriptorEntry(key=RATE_LIMIT_KEY, value=c.name)]
        descriptors.append(LocalRateLimitDescriptor(entries=entries, token_bucket=bucket))
    config = LocalRateLimit(
        stat_prefix="consumer_rate_limit",
        filter_enabled=_all_of_the_time(),
        filter_enforced=_all_of_the_time(),
        descriptors=descriptors,
        rate_limits=[RateLimitConfig(actions=[RateLimitAction(metadata=consumer)])],
        # x-ratelimit-* on every limited route's response; local_reply turns -reset into retry-after.
        enable_x_ratelimit_headers=XRateLimitHeadersRfcVersion.DRAFT_VERSION_03,
    )
    return HttpFilter(name="envoy.filters.http.local_ratelimit", typed_config=_any(config))


def auth_filters(registry: Registry) -> list[HttpFilter]:
    """Authenticate, authorize, rate-limit: all in Envoy, before ext_proc; none without consumers."""
    if not registry.consumers:
        return []
    filters = [jwt_filter(registry)] if any(c.jwt is not None for c in registry.consumers) else []
    lua = Lua(default_source_code=DataSource(inline_string=authentication_lua(registry)))
    filters.append(HttpFilter(name=LUA_FILTER, typed_config=_any(lua)))
    filters.append(HttpFilter(name=AUTHZ_FILTER, typed_config=_any(Rbac())))
    limited = [c for c in registry.consumers if c.rate_limit is not None]
    if limited:
        filters.append(rate_limit_filter(limited))
    return filters


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


def _unknown_route() -> Route:
    return Route(
        name="unknown",
        match=RouteMatch(prefix="/"),
        direct_response=_direct(404, "unknown_route", "no model is served at this path; GET /models lists them"),
        typed_per_filter_config=_without_broker(),
    )


def public_listener(registry: Registry, xds: XdsFiles | None = None) -> Listener:
    """In dynamic mode (`xds`) every optional filter is in the chain: routes switch them on."""
    limits = registry.limits
    dynamic = xds is not None
    hcm = HttpConnectionManager(
        stat_prefix="public",
        http_filters=[
            *auth_filters(registry),
            ext_proc_filter(registry, dynamic),
            *([ensemble_ext_proc_filter(registry, dynamic)] if registry.ensembles or dynamic else []),
            *([shadow_recorder_filter(registry, disabled=True)] if _shadowed(registry) or dynamic else []),
            HttpFilter(
                name="envoy.filters.http.buffer",
                typed_config=_any(Buffer(max_request_bytes=limits.max_body_bytes + limits.feature_headroom_bytes)),
            ),
            # After the buffer, so it runs once the broker has answered the body phase.
            HttpFilter(name=RBAC_FILTER, typed_config=_any(Rbac())),
            HttpFilter(name="envoy.filters.http.router", typed_config=_any(Router())),
        ],
        local_reply_config=local_reply_config(auth=bool(registry.consumers)),
        # Clients are external: Envoy sets x-forwarded-for and its own x-request-id.
        use_remote_address=True,
        # The id in every error body and (later) audit record; clients quote it to support.
        always_set_request_id_in_response=True,
    )
    _routes(hcm, route_configuration(registry), xds)
    return _listener("public", registry.listener.address, registry.listener.port, hcm, _downstream_tls(registry))


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


def egress_route_configuration(registry: Registry) -> RouteConfiguration:
    return RouteConfiguration(
        name=EGRESS_ROUTES,
        virtual_hosts=[VirtualHost(name="egress", domains=["*"], routes=[*_egress_routes(registry), _unknown_route()])],
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


def _endpoints(
    name: str, hosts: list[tuple[str, int]], metadata: dict[str, Any] | None = None
) -> ClusterLoadAssignment:
    meta = Metadata(filter_metadata={wire.METADATA_NAMESPACE: Struct.from_dict(metadata)}) if metadata else None
    endpoints = [LbEndpoint(endpoint=Endpoint(address=_socket(h, p)), metadata=meta) for h, p in hosts]
    return ClusterLoadAssignment(cluster_name=name, endpoints=[LocalityLbEndpoints(lb_endpoints=endpoints)])


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def ext_proc_cluster(registry: Registry, workers: int, host: str | None = None) -> Cluster:
    """One endpoint per broker worker: Envoy balances gRPC streams across them.

    A DNS `host` (a headless Service) resolves to every broker pod, so each
    port endpoint becomes one per pod: pods times workers endpoints.
    """
    broker = registry.broker
    ports = [broker.port + i for i in range(workers)]
    return _broker_grpc_cluster(wire.EXT_PROC_CLUSTER, host or broker.address, ports, ClusterLbPolicy.LEAST_REQUEST)


def _broker_grpc_cluster(name: str, target: str, ports: list[int], lb_policy: ClusterLbPolicy) -> Cluster:
    """HTTP/2 to the broker's processes: loopback, or every pod behind a headless Service's DNS name.

    IPv4 first, as the broker binds it by default (Envoy's AUTO would try `::1` for localhost).
    """
    return Cluster(
        name=name,
        type=ClusterDiscoveryType.STATIC if _is_ip(target) else ClusterDiscoveryType.STRICT_DNS,
        dns_lookup_family=ClusterDnsLookupFamily.V4_PREFERRED,
        connect_timeout=_ms(250),
        lb_policy=lb_policy,
        load_assignment=_endpoints(name, [(target, port) for port in ports]),
        typed_extension_protocol_options=_http2_options(),
    )


def shared_path(model: Model) -> str | None:
    """The backend path when every version serves on the same one, else None."""
    paths = {_backend(v)[2] for v in model.versions}
    return paths.pop() if len(paths) == 1 else None


def _backend(version: Version) -> tuple[str, int, str]:
    """(host, port, path) of a version's backend."""
    service: ServiceBackend | None = version.backend.service
    if service is not None:
        return service.host, service.port, service.path
    sagemaker = version.backend.sagemaker
    assert sagemaker is not None  # the registry guarantees exactly one backend kind
    return sagemaker.host, sagemaker.port, sagemaker.path


def credential_provider(sources: tuple[str, ...]) -> AwsCredentialProvider:
    """Exactly the declared sources (a custom chain): no instance-metadata probe unless listed."""
    return AwsCredentialProvider(
        custom_credential_provider_chain=True,
        environment_credential_provider=EnvironmentCredentialProvider() if "environment" in sources else None,
        credentials_file_provider=CredentialsFileCredentialProvider() if "credentials_file" in sources else None,
        container_credential_provider=ContainerCredentialProvider() if "container" in sources else None,
        instance_profile_credential_provider=(
            InstanceProfileCredentialProvider() if "instance_metadata" in sources else None
        ),
    )


def _upstream_filters(path: str | None, signing: SageMakerBackend | None) -> list[HttpFilter]:
    """Per-version upstream filters: path rewrite where versions differ, SigV4 for SageMaker, codec last."""
    filters = []
    if path is not None:
        # Envoy forbids `:path` in header_mutation and a route rewrite is per route, not per
        # version; a one-line Lua filter is the per-cluster rewrite Envoy offers.
        code = f"function envoy_on_request(h) h:headers():replace(':path', {json.dumps(path)}) end"
        filters.append(
            HttpFilter(
                name="envoy.filters.http.lua",
                typed_config=_any(Lua(default_source_code=DataSource(inline_string=code))),
            )
        )
    if signing is not None:
        # After the path rewrite, so the signature covers the path SageMaker sees; the Host
        # is rewritten here too, per cluster, since versions of one route may differ.
        sigv4 = AwsRequestSigning(
            service_name="sagemaker",
            region=signing.region,
            host_rewrite=signing.authority,
            credential_provider=credential_provider(signing.credentials),
        )
        filters.append(HttpFilter(name="envoy.filters.http.aws_request_signing", typed_config=_any(sigv4)))
    filters.append(HttpFilter(name="envoy.filters.http.upstream_codec", typed_config=_any(UpstreamCodec())))
    return filters


def version_cluster(model: Model, version: Version) -> Cluster:
    name = wire.version_cluster(model.name, version.name)
    host, port, path = _backend(version)
    sagemaker = version.backend.sagemaker
    upstream_path = None if shared_path(model) is not None else path
    options = HttpProtocolOptions(
        explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(http_protocol_options=Http1ProtocolOptions()),
    )
    if upstream_path is not None or sagemaker is not None:
        options.http_filters = _upstream_filters(upstream_path, sagemaker)
    cluster = Cluster(
        name=name,
        type=ClusterDiscoveryType.STATIC if _is_ip(host) else ClusterDiscoveryType.STRICT_DNS,
        connect_timeout=_ms(1000),
        lb_policy=ClusterLbPolicy.ROUND_ROBIN,
        load_assignment=_endpoints(name, [(host, port)], {wire.META_VERSION: version.name}),
        typed_extension_protocol_options={HTTP_PROTOCOL_OPTIONS: _any(options)},
    )
    if sagemaker is not None and sagemaker.tls:
        cluster.transport_socket = TransportSocket(name=TLS_SOCKET, typed_config=_any(_verified_tls(host)))
    return cluster


def _verified_tls(host: str) -> UpstreamTlsContext:
    """TLS that checks the server (OS CA bundle, a certificate for `host`): signed requests go there."""
    san = SubjectAltNameMatcher(san_type=SubjectAltNameMatcherSanType.DNS, matcher=StringMatcher(exact=host))
    validation = CertificateValidationContext(
        trusted_ca=DataSource(filename=SYSTEM_CA_BUNDLE), match_typed_subject_alt_names=[san]
    )
    return UpstreamTlsContext(sni=host, common_tls_context=CommonTlsContext(validation_context=validation))


def _http2_options() -> dict[str, AnyMessage]:
    return {
        HTTP_PROTOCOL_OPTIONS: _any(
            HttpProtocolOptions(
                explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
                    http2_protocol_options=Http2ProtocolOptions()
                )
            )
        )
    }


def control_plane_cluster(registry: Registry, host: str | None = None) -> Cluster:
    """The rollout control plane (gRPC): live weights, stats and shadow answers for this Envoy.

    Beside the broker on one machine; on Kubernetes `host` is its own Service.
    """
    plane = registry.control_plane
    return _broker_grpc_cluster(
        wire.CONTROL_PLANE_CLUSTER, host or plane.address, [plane.port], ClusterLbPolicy.ROUND_ROBIN
    )


def _control_plane_source() -> ConfigSource:
    return ConfigSource(
        resource_api_version=ApiVersion.V3,
        api_config_source=ApiConfigSource(
            api_type=ApiConfigSourceApiType.GRPC,
            transport_api_version=ApiVersion.V3,
            grpc_services=[GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=wire.CONTROL_PLANE_CLUSTER))],
        ),
        # Envoy holds its listeners until the first layer arrives, so a restarted Envoy
        # serves the live split, not the registry's; after this it falls back to the registry's.
        initial_fetch_timeout=timedelta(seconds=10),
    )


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


def jwks_clusters(registry: Registry) -> list[Cluster]:
    """One cluster per host that serves a JWKS URL (HTTPS unless the URL says http)."""
    clusters: dict[str, Cluster] = {}
    for consumer in registry.consumers:
        uri = consumer.jwt.jwks_uri if consumer.jwt is not None else None
        if uri is None:
            continue
        parts = urlsplit(uri)
        host = parts.hostname or ""
        name = jwks_cluster_name(uri)
        cluster = Cluster(
            name=name,
            type=ClusterDiscoveryType.STATIC if _is_ip(host) else ClusterDiscoveryType.STRICT_DNS,
            connect_timeout=_ms(1000),
            load_assignment=_endpoints(name, [(host, parts.port or (443 if parts.scheme == "https" else 80))]),
        )
        if parts.scheme == "https":
            cluster.transport_socket = TransportSocket(name=TLS_SOCKET, typed_config=_any(UpstreamTlsContext(sni=host)))
        clusters[name] = cluster
    return list(clusters.values())


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


def admin_cluster(registry: Registry) -> Cluster:
    return Cluster(
        name=ADMIN_CLUSTER,
        type=ClusterDiscoveryType.STATIC,
        connect_timeout=_ms(250),
        load_assignment=_endpoints(ADMIN_CLUSTER, [(registry.admin.address, registry.admin.port)]),
    )


def route_configurations(registry: Registry) -> list[RouteConfiguration]:
    """Dynamic mode: every listener's routes (the routes file), empty ones included."""
    return [route_configuration(registry), egress_route_configuration(registry), shadow_route_configuration(registry)]


def model_clusters(registry: Registry) -> list[Cluster]:
    """One cluster per model version: the clusters file in dynamic mode."""
    return [version_cluster(m, v) for m in registry.models for v in m.versions]


def bootstrap(
    registry: Registry, workers: int | None = None, placement: Placement = Placement(), xds: XdsFiles | None = None
) -> Bootstrap:
    """Static by default; with `xds`, routes and model clusters come from files (`envoy_files`)."""
    count = workers or registry.broker.workers
    dynamic = xds is not None
    listeners = [public_listener(registry, xds)]
    if registry.ensembles or dynamic:
        listeners.append(egress_listener(registry, xds))
    clusters = [ext_proc_cluster(registry, count, placement.broker_host)]
    clusters.append(control_plane_cluster(registry, placement.control_plane_host))
    if xds is None:
        clusters += model_clusters(registry)
    clusters += jwks_clusters(registry)
    if placement.stats_port is not None:
        listeners.append(stats_listener(registry, placement.stats_port))
        clusters.append(admin_cluster(registry))
    extensions = []
    if _shadowed(registry) or dynamic:
        listeners.append(shadow_listener(registry, xds))
        clusters.append(shadow_cluster())
        extensions.append(
            TypedExtensionConfig(name="envoy.bootstrap.internal_listener", typed_config=_any(InternalListener()))
        )
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
    )


def bootstrap_dict(
    registry: Registry, workers: int | None = None, placement: Placement = Placement(), xds: XdsFiles | None = None
) -> dict[str, Any]:
    doc: dict[str, Any] = bootstrap(registry, workers, placement, xds).to_dict()
    return doc


def render_yaml(registry: Registry, workers: int | None = None, placement: Placement = Placement()) -> str:
    return yaml.safe_dump(bootstrap_dict(registry, workers, placement), sort_keys=False)
