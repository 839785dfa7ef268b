"""Clusters: the broker workers, each model version (service or SageMaker with SigV4), control plane, JWKS, admin."""

from __future__ import annotations

import ipaddress
import json
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from envoy_data_plane.envoy.config.cluster.v3 import (
    Cluster,
    ClusterDiscoveryType,
    ClusterDnsLookupFamily,
    ClusterLbPolicy,
)
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    ApiConfigSource,
    ApiConfigSourceApiType,
    ApiVersion,
    ConfigSource,
    DataSource,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    Http1ProtocolOptions,
    Http2ProtocolOptions,
    Metadata,
    Pipe,
    TransportSocket,
)
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints
from envoy_data_plane.envoy.extensions.common.aws.v3 import (
    AwsCredentialProvider,
    ContainerCredentialProvider,
    CredentialsFileCredentialProvider,
    EnvironmentCredentialProvider,
    InstanceProfileCredentialProvider,
)
from envoy_data_plane.envoy.extensions.filters.http.aws_request_signing.v3 import AwsRequestSigning
from envoy_data_plane.envoy.extensions.filters.http.lua.v3 import Lua
from envoy_data_plane.envoy.extensions.filters.http.upstream_codec.v3 import UpstreamCodec
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpFilter,
)
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
    StringMatcher,
)
from envoy_data_plane.google.protobuf import Any as AnyMessage
from envoy_data_plane.google.protobuf import Struct

from extproc import wire
from extproc.envoy.auth import jwks_cluster_name
from extproc.envoy.common import ADMIN_CLUSTER, HTTP_PROTOCOL_OPTIONS, SYSTEM_CA_BUNDLE, TLS_SOCKET, _any, _ms, _socket
from extproc.envoy.edge import resilient
from extproc.envoy.open_inference import path_rewrite_lua
from extproc.registry import (
    Model,
    Registry,
    SageMakerBackend,
    ServiceBackend,
    Version,
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


def ext_proc_cluster(
    registry: Registry, workers: int, host: str | None = None, socket_dir: str | None = None
) -> Cluster:
    """One endpoint per broker worker: Envoy balances gRPC streams across them.

    A DNS `host` (a headless Service) resolves to every broker pod, so each
    port endpoint becomes one per pod: pods times workers endpoints. With
    `socket_dir` (same host, no `host`), the workers' Unix sockets instead.
    """
    broker = registry.broker
    if socket_dir is not None and host is None:
        cluster = _pipes_cluster(
            wire.EXT_PROC_CLUSTER, [wire.broker_socket(socket_dir, "grpc", i) for i in range(workers)]
        )
        cluster.typed_extension_protocol_options = _http2_options()
        return resilient(cluster, registry, workers)
    ports = [broker.port + i for i in range(workers)]
    cluster = _broker_grpc_cluster(wire.EXT_PROC_CLUSTER, host or broker.address, ports, ClusterLbPolicy.LEAST_REQUEST)
    return resilient(cluster, registry, workers)


def ext_proc_http_cluster(
    registry: Registry, workers: int, host: str | None = None, socket_dir: str | None = None
) -> Cluster:
    """The same workers' `http_service` ports (or Unix sockets): HTTP/1.1, keep-alive connections per Envoy thread."""
    if socket_dir is not None and host is None:
        pipes = _pipes_cluster(
            wire.EXT_PROC_HTTP_CLUSTER, [wire.broker_socket(socket_dir, "http", i) for i in range(workers)]
        )
        return resilient(pipes, registry, workers)
    broker = registry.broker
    target = host or broker.address
    cluster = Cluster(
        name=wire.EXT_PROC_HTTP_CLUSTER,
        type=ClusterDiscoveryType.STATIC if _is_ip(target) else ClusterDiscoveryType.STRICT_DNS,
        dns_lookup_family=ClusterDnsLookupFamily.V4_PREFERRED,
        connect_timeout=_ms(250),
        lb_policy=ClusterLbPolicy.LEAST_REQUEST,
        load_assignment=_endpoints(
            wire.EXT_PROC_HTTP_CLUSTER, [(target, broker.http_port + i) for i in range(workers)]
        ),
    )
    return resilient(cluster, registry, workers)


def _pipes_cluster(name: str, paths: list[str]) -> Cluster:
    """Workers on this host, one Unix socket each."""
    endpoints = [LbEndpoint(endpoint=Endpoint(address=Address(pipe=Pipe(path=path)))) for path in paths]
    return Cluster(
        name=name,
        type=ClusterDiscoveryType.STATIC,
        connect_timeout=_ms(250),
        lb_policy=ClusterLbPolicy.LEAST_REQUEST,
        load_assignment=ClusterLoadAssignment(
            cluster_name=name, endpoints=[LocalityLbEndpoints(lb_endpoints=endpoints)]
        ),
    )


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


def _upstream_filters(rewrite: str | None, signing: SageMakerBackend | None) -> list[HttpFilter]:
    """Per-version upstream filters: path rewrite (Lua code) where needed, SigV4 for SageMaker, codec last."""
    filters = []
    if rewrite is not None:
        filters.append(
            HttpFilter(
                name="envoy.filters.http.lua",
                typed_config=_any(Lua(default_source_code=DataSource(inline_string=rewrite))),
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


def _path_rewrite(model: Model, path: str) -> str | None:
    """Lua code setting this version's path upstream, or None when the route's rewrite does.

    Envoy forbids `:path` in header_mutation and a route rewrite is per route, not per
    version; a one-line Lua filter is the per-cluster rewrite Envoy offers. OIP backends
    always rewrite here: their clusters serve infer, metadata and readiness paths.
    """
    if model.protocol == "open_inference":
        return path_rewrite_lua(path)
    if shared_path(model) is not None:
        return None
    return f"function envoy_on_request(h) h:headers():replace(':path', {json.dumps(path)}) end"


def version_cluster(model: Model, version: Version) -> Cluster:
    name = wire.version_cluster(model.name, version.name)
    host, port, path = _backend(version)
    sagemaker = version.backend.sagemaker
    options = HttpProtocolOptions(
        explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(http_protocol_options=Http1ProtocolOptions()),
    )
    rewrite = _path_rewrite(model, path)
    if rewrite is not None or sagemaker is not None:
        options.http_filters = _upstream_filters(rewrite, sagemaker)
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


def feedback_cluster(registry: Registry, host: str | None = None) -> Cluster:
    """The control plane's feedback listener (HTTP/1.1): `POST /v1/feedback`, once Envoy authenticated it."""
    plane = registry.control_plane
    target = host or plane.address
    return Cluster(
        name=wire.FEEDBACK_CLUSTER,
        type=ClusterDiscoveryType.STATIC if _is_ip(target) else ClusterDiscoveryType.STRICT_DNS,
        connect_timeout=_ms(1000),
        load_assignment=_endpoints(wire.FEEDBACK_CLUSTER, [(target, plane.feedback_port)]),
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


def admin_cluster(registry: Registry) -> Cluster:
    return Cluster(
        name=ADMIN_CLUSTER,
        type=ClusterDiscoveryType.STATIC,
        connect_timeout=_ms(250),
        load_assignment=_endpoints(ADMIN_CLUSTER, [(registry.admin.address, registry.admin.port)]),
    )


def model_clusters(registry: Registry) -> list[Cluster]:
    """One cluster per model version: the clusters file in dynamic mode."""
    clusters = [version_cluster(m, v) for m in registry.models for v in m.versions]
    for cluster in clusters:
        # Envoy's edge recommendation: flow control beyond 32 KiB per model connection.
        cluster.per_connection_buffer_limit_bytes = registry.listener.buffer_limit_bytes
    return clusters
