"""The access log that hands the broker an audited request whose response phase never came.

Over gRPC the end of a request's stream tells the broker that no response will come (the
client left, the stream was reset), and it records the execution with status null. Over
`http_service` there is no stream: the audit draft rides in Envoy's dynamic metadata
(`audit.carried`) and the response phase clears it. A request that ends with the draft
still there is logged, only then, to the broker's access-log service on its gRPC port,
which writes the record the response phase would have written, with status null.
"""

from __future__ import annotations

from envoy_data_plane.envoy.config.accesslog.v3 import AccessLog
from envoy_data_plane.envoy.config.core.v3 import ApiVersion, GrpcService, GrpcServiceEnvoyGrpc
from envoy_data_plane.envoy.extensions.access_loggers.grpc.v3 import (
    CommonGrpcAccessLogConfig,
    HttpGrpcAccessLogConfig,
)

from extproc import wire
from extproc.envoy.common import _any, _ms
from extproc.envoy.ext_proc import audits_any, over_http
from extproc.envoy.local_replies import _cel
from extproc.registry import Registry

# How long Envoy may hold a batch of such entries before sending it.
FLUSH_MS = 200
# A draft the response phase has not cleared (it answers with the key set to "").
PENDING = f"metadata.filter_metadata['{wire.METADATA_NAMESPACE}']['{wire.META_AUDIT_DRAFT}'] != ''"


def unanswered_logs(registry: Registry, dynamic: bool) -> list[AccessLog]:
    """The public listener's access log of drafts left pending, where audited routes use `http_service`."""
    if not (over_http(registry) and audits_any(registry, dynamic)):
        return []
    config = HttpGrpcAccessLogConfig(
        common_config=CommonGrpcAccessLogConfig(
            log_name=wire.UNANSWERED_LOG,
            grpc_service=GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=wire.EXT_PROC_CLUSTER)),
            transport_api_version=ApiVersion.V3,
            buffer_flush_interval=_ms(FLUSH_MS),
        )
    )
    return [AccessLog(name="envoy.access_loggers.http_grpc", filter=_cel(PENDING), typed_config=_any(config))]
