"""The Envoy bootstrap, generated from the registry with typed messages (envoy-data-plane).

Filter chain on the public listener: ext_proc (request body only, buffered) →
buffer (holds the request until the broker has answered; its limit is the body
limit) → router (weighted clusters per model). See `envoy/README.md`.
"""

from __future__ import annotations

import ipaddress
import json
from datetime import timedelta
from typing import Any

import betterproto2
import yaml
from envoy_data_plane.envoy.config.accesslog.v3 import (
    AccessLogFilter,
    ComparisonFilter,
    ComparisonFilterOp,
    ExtensionFilter,
    StatusCodeFilter,
)
from envoy_data_plane.envoy.config.bootstrap.v3 import (
    Admin,
    Bootstrap,
    BootstrapStaticResources,
    LayeredRuntime,
    RuntimeLayer,
    RuntimeLayerAdminLayer,
    RuntimeLayerRtdsLayer,
)
from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType, ClusterLbPolicy
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
    Metadata,
    Node,
    RuntimeUInt32,
    SocketAddress,
    SubstitutionFormatString,
    TransportSocket,
    TypedExtensionConfig,
)
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener, ListenerInternalListenerConfig
from envoy_data_plane.envoy.config.metrics.v3 import StatsSink
from envoy_data_plane.envoy.config.rbac.v3 import Permission, Policy, Principal, RbacAction, SourcedMetadata
from envoy_data_plane.envoy.config.rbac.v3 import Rbac as Rules
from envoy_data_plane.envoy.config.route.v3 import (
    DirectResponseAction,
    FilterConfig,
    HeaderMatcher,
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
from envoy_data_plane.envoy.extensions.access_loggers.filters.cel.v3 import ExpressionFilter
from envoy_data_plane.envoy.extensions.bootstrap.internal_listener.v3 import InternalListener
from envoy_data_plane.envoy.extensions.common.aws.v3 import (
    AwsCredentialProvider,
    ContainerCredentialProvider,
    CredentialsFileCredentialProvider,
    EnvironmentCredentialProvider,
    InstanceProfileCredentialProvider,
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
from envoy_data_plane.envoy.extensions.filters.http.lua.v3 import Lua
from envoy_data_plane.envoy.extensions.filters.http.rbac.v3 import Rbac, RbacPerRoute
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.http.upstream_codec.v3 import UpstreamCodec
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpFilter,
    LocalReplyConfig,
    ResponseMapper,
)
from envoy_data_plane.envoy.extensions.stat_sinks.open_telemetry.v3 import SinkConfig
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CommonTlsContext,
    SubjectAltNameMatcher,
    SubjectAltNameMatcherSanType,
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
from envoy_data_plane.envoy.type.v3 import HttpStatus, StatusCode
from envoy_data_plane.google.protobuf import Any as AnyMessage
from envoy_data_plane.google.protobuf import Struct

from extproc import wire
from extproc.registry import Model, Registry, SageMakerBackend, ServiceBackend, Version

EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
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


def _status_at_least(code: int) -> AccessLogFilter:
    return AccessLogFilter(
        status_code_filter=StatusCodeFilter(
            comparison=ComparisonFilter(
                op=ComparisonFilterOp.GE, value=RuntimeUInt32(default_value=code, runtime_key="unused")
            )
        )
    )


def _mapper(condition: str, status: int, code: str, message: str) -> ResponseMapper:
    return ResponseMapper(
        filter=_cel(f"{NOT_BROKER} && ({condition})"),
        status_code=status,
        body_format_override=_error_json(code, message),
    )


def local_reply_config() -> LocalReplyConfig:
    """Envoy's own replies (body too large, broker down, model down) as JSON, details hidden."""
    return LocalReplyConfig(
        mappers=[
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


def ext_proc_filter(registry: Registry) -> HttpFilter:
    config = ExternalProcessor(
        grpc_service=GrpcService(
            envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=wire.EXT_PROC_CLUSTER),
            timeout=_ms(registry.broker.message_timeout_ms),
        ),
        # Fail closed: a request the broker never saw must not reach a model unenriched.
        failure_mode_allow=False,
        # One message per request: the buffered body. Header and response phases
        # are asked for per route, only where a feature needs them.
        processing_mode=ProcessingMode(
            request_header_mode=Send.SKIP,
            request_body_mode=Body.BUFFERED,
            response_header_mode=Send.SKIP,
            response_body_mode=Body.NONE,
            request_trailer_mode=Send.SKIP,
            response_trailer_mode=Send.SKIP,
        ),
        message_timeout=_ms(registry.broker.message_timeout_ms),
        request_attributes=list(wire.REQUEST_ATTRIBUTES),
        metadata_options=MetadataOptions(
            receiving_namespaces=MetadataOptionsMetadataNamespaces(untyped=[wire.METADATA_NAMESPACE])
        ),
        status_on_error=HttpStatus(code=StatusCode.ServiceUnavailable),
    )
    return HttpFilter(name=EXT_PROC_FILTER, typed_config=_any(config))


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


def _headers_and_body() -> AnyMessage:
    """Sticky-by-body routes: the header phase too, or Envoy drops the body phase's header mutation.

    An override replaces the whole processing mode, so the body mode is repeated here.
    """
    per_route = ExtProcPerRoute(
        overrides=ExtProcOverrides(
            processing_mode=ProcessingMode(
                request_header_mode=Send.SEND, request_body_mode=Body.BUFFERED, response_header_mode=Send.SKIP
            )
        )
    )
    return _any(per_route)


def _sticky(model: Model) -> tuple[list[RouteActionHashPolicy], dict[str, AnyMessage]]:
    """The header Envoy hashes to pick a version, and the ext_proc override the route needs for it."""
    if model.sticky is None:
        return [], {}
    if model.sticky.header is not None:
        # The client's own header: Envoy hashes it, the broker is not involved.
        return [RouteActionHashPolicy(header=RouteActionHashPolicyHeader(header_name=model.sticky.header))], {}
    policy = RouteActionHashPolicy(header=RouteActionHashPolicyHeader(header_name=wire.HEADER_STICKY_KEY))
    return [policy], {EXT_PROC_FILTER: _headers_and_body()}


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
        response_attributes=list(wire.RESPONSE_ATTRIBUTES),
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


def shadow_listener(registry: Registry) -> Listener:
    """An internal listener: mirrored requests go to each model's shadow version, answers to the recorder."""
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
    hcm = HttpConnectionManager(
        stat_prefix="shadow",
        route_config=RouteConfiguration(
            name="shadow", virtual_hosts=[VirtualHost(name="shadow", domains=["*"], routes=routes)]
        ),
        http_filters=[
            shadow_recorder_filter(registry, disabled=False),
            HttpFilter(name="envoy.filters.http.router", typed_config=_any(Router())),
        ],
        # The mirrored request keeps the client request's id: that is how the answers are paired.
        preserve_external_request_id=True,
    )
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


def _model_routes(model: Model) -> list[Route]:
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
    hash_policy, sticky_filters = _sticky(model)
    if model.shadow is not None:
        sticky_filters = {**sticky_filters, wire.SHADOW_RECORDER_FILTER: _recorder_on()}
    metadata = f"%DYNAMIC_METADATA({wire.METADATA_NAMESPACE}:{{}})%"
    served = Route(
        name=model.name,
        match=RouteMatch(
            path=model.path, headers=[HeaderMatcher(name=":method", string_match=StringMatcher(exact="POST"))]
        ),
        typed_per_filter_config={RBAC_FILTER: _any(_broker_approved()), **sticky_filters},
        route=RouteAction(
            weighted_clusters=weighted,
            hash_policy=hash_policy,
            request_mirror_policies=_mirror(model),
            timeout=_ms(model.timeout_ms),
            # One path for all versions: rewrite on the route; else each cluster rewrites its own.
            regex_rewrite=_rewrite_to(path) if (path := shared_path(model)) else None,
        ),
        response_headers_to_add=[
            _header(wire.HEADER_MODEL, model.name),
            # From the metadata of the upstream host that answered: absent when no model did.
            _header(wire.HEADER_VERSION, f"%UPSTREAM_METADATA({wire.METADATA_NAMESPACE}:{wire.META_VERSION})%"),
            _header(wire.HEADER_SERVER_TIMING, metadata.format(wire.META_SERVER_TIMING)),
            _header(wire.HEADER_DEGRADED, metadata.format(wire.META_DEGRADED)),
        ],
    )
    wrong_method = Route(
        name=f"{model.name}:method",
        match=RouteMatch(path=model.path),
        direct_response=_direct(405, "method_not_allowed", f"{model.path} accepts POST only"),
        typed_per_filter_config=_without_broker(),
        response_headers_to_add=[_header("allow", "POST")],
    )
    return [served, wrong_method]


def _target_variant(version: Version) -> list[HeaderValueOption]:
    """SageMaker's production-variant pin; added on the route, so the upstream signer covers it."""
    sagemaker = version.backend.sagemaker
    if sagemaker is None or sagemaker.target_variant is None:
        return []
    return [_header(SAGEMAKER_TARGET_VARIANT, sagemaker.target_variant)]


def _rewrite_to(path: str) -> RegexMatchAndSubstitute:
    return RegexMatchAndSubstitute(pattern=RegexMatcher(regex="^.*$"), substitution=path)


def route_configuration(registry: Registry) -> RouteConfiguration:
    routes = [
        _broker_route(wire.ROUTE_HEALTHZ, wire.PATH_HEALTHZ),
        _broker_route(wire.ROUTE_MODELS, wire.PATH_MODELS),
    ]
    for model in registry.models:
        routes += _model_routes(model)
    routes.append(
        Route(
            name="unknown",
            match=RouteMatch(prefix="/"),
            direct_response=_direct(404, "unknown_route", "no model is served at this path; GET /models lists them"),
            typed_per_filter_config=_without_broker(),
        )
    )
    return RouteConfiguration(
        name="models",
        virtual_hosts=[VirtualHost(name="models", domains=["*"], routes=routes)],
    )


def public_listener(registry: Registry) -> Listener:
    limits = registry.limits
    hcm = HttpConnectionManager(
        stat_prefix="public",
        route_config=route_configuration(registry),
        http_filters=[
            ext_proc_filter(registry),
            *([shadow_recorder_filter(registry, disabled=True)] if _shadowed(registry) else []),
            HttpFilter(
                name="envoy.filters.http.buffer",
                typed_config=_any(Buffer(max_request_bytes=limits.max_body_bytes + limits.feature_headroom_bytes)),
            ),
            # After the buffer, so it runs once the broker has answered the body phase.
            HttpFilter(name=RBAC_FILTER, typed_config=_any(Rbac())),
            HttpFilter(name="envoy.filters.http.router", typed_config=_any(Router())),
        ],
        local_reply_config=local_reply_config(),
        # Clients are external: Envoy sets x-forwarded-for and its own x-request-id.
        use_remote_address=True,
        # The id in every error body and (later) audit record; clients quote it to support.
        always_set_request_id_in_response=True,
    )
    return Listener(
        name="public",
        address=_socket(registry.listener.address, registry.listener.port),
        filter_chains=[
            FilterChain(filters=[Filter(name="envoy.filters.network.http_connection_manager", typed_config=_any(hcm))])
        ],
    )


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


def ext_proc_cluster(registry: Registry, workers: int) -> Cluster:
    """One endpoint per broker worker: Envoy balances gRPC streams across them."""
    broker = registry.broker
    return Cluster(
        name=wire.EXT_PROC_CLUSTER,
        type=ClusterDiscoveryType.STATIC,
        connect_timeout=_ms(250),
        lb_policy=ClusterLbPolicy.LEAST_REQUEST,
        load_assignment=_endpoints(wire.EXT_PROC_CLUSTER, [(broker.address, broker.port + i) for i in range(workers)]),
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
        cluster.transport_socket = TransportSocket(
            name="envoy.transport_sockets.tls", typed_config=_any(_verified_tls(host))
        )
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


def control_plane_cluster(registry: Registry) -> Cluster:
    """The broker's control plane (gRPC): live weights for this Envoy."""
    plane = registry.control_plane
    return Cluster(
        name=wire.CONTROL_PLANE_CLUSTER,
        type=ClusterDiscoveryType.STATIC,
        connect_timeout=_ms(250),
        load_assignment=_endpoints(wire.CONTROL_PLANE_CLUSTER, [(plane.address, plane.port)]),
        typed_extension_protocol_options=_http2_options(),
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


def bootstrap(registry: Registry, workers: int | None = None) -> Bootstrap:
    count = workers or registry.broker.workers
    clusters = [ext_proc_cluster(registry, count), control_plane_cluster(registry)]
    clusters += [version_cluster(m, v) for m in registry.models for v in m.versions]
    listeners = [public_listener(registry)]
    extensions = []
    if _shadowed(registry):
        listeners.append(shadow_listener(registry))
        clusters.append(shadow_cluster())
        extensions.append(
            TypedExtensionConfig(name="envoy.bootstrap.internal_listener", typed_config=_any(InternalListener()))
        )
    return Bootstrap(
        # xDS subscriptions need a node identity; `--service-node` overrides the id per replica.
        node=Node(id="model-broker-envoy", cluster="model-broker"),
        admin=Admin(address=_socket(registry.admin.address, registry.admin.port)),
        static_resources=BootstrapStaticResources(listeners=listeners, clusters=clusters),
        bootstrap_extensions=extensions,
        layered_runtime=layered_runtime(),
        stats_sinks=[stats_sink()],
        stats_flush_interval=timedelta(seconds=STATS_FLUSH_SECONDS),
    )


def bootstrap_dict(registry: Registry, workers: int | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = bootstrap(registry, workers).to_dict()
    return doc


def render_yaml(registry: Registry, workers: int | None = None) -> str:
    return yaml.safe_dump(bootstrap_dict(registry, workers), sort_keys=False)
