"""Every name that crosses the Envoy ↔ broker boundary, in one place.

The Envoy config generator (`extproc/envoy/`) and the ext_proc server both
import from here, so a rename can never leave one side behind.
"""

from __future__ import annotations

from typing import Final

# Namespace of the dynamic metadata the broker emits; Envoy drops any namespace
# not listed in the filter's `metadata_options.receiving_namespaces`.
METADATA_NAMESPACE: Final = "model_broker"
# Server-Timing value for the response, read by `%DYNAMIC_METADATA(...)%`.
META_SERVER_TIMING: Final = "server_timing"
# Set on every request the broker let through; Envoy's RBAC filter refuses model
# requests without it (a request with no body never reaches the body phase).
META_APPROVED: Final = "approved"
# Endpoint metadata of each version cluster: the version name Envoy reports.
META_VERSION: Final = "version"
# Set when a fail-open model was forwarded without features; becomes a response header.
META_DEGRADED: Final = "degraded"
# The version a segment rule pinned. Each model with rules has one route per version a rule
# names, matching this key (`dynamic_metadata`); the broker's answer has Envoy match the route
# again (clear_route_cache), so the pin costs no extra ext_proc message.
META_PIN: Final = "pin"
# An audited request's draft, carried by Envoy from its request to its response phase where
# the two are separate `http_service` calls (`audit.carried`); forwarded back on those routes only.
META_AUDIT_DRAFT: Final = "audit_draft"
# The access log Envoy sends the broker a draft on when its response phase never came (`envoy.unanswered`).
UNANSWERED_LOG: Final = "model_broker_unanswered"

# Who the caller is, written by Envoy's authentication (Lua) filter after it
# verified an API key or a JWT. A namespace of its own: ext_proc accepts only
# `model_broker` from the broker, so not even the broker can write this one, and
# clients cannot write dynamic metadata at all. Forwarded to the broker as
# `ProcessingRequest.metadata_context`.
AUTH_NAMESPACE: Final = "model_broker_auth"
META_CONSUMER: Final = "consumer"
# Seconds until a rate-limited consumer's bucket has a token again: the 429's retry-after.
META_RETRY_AFTER: Final = "retry_after"
# Where jwt_authn writes verified payloads, one key per consumer (`payload_in_metadata`).
JWT_AUTHN_NAMESPACE: Final = "envoy.filters.http.jwt_authn"

# Request attributes the ext_proc filter sends with the first message (CEL names).
# With the header phase skipped they are the broker's only view of the request.
ATTR_ROUTE_NAME: Final = "xds.route_name"
ATTR_REQUEST_ID: Final = "request.id"
ATTR_HEADER_PREFIX: Final = "request.headers['"
ATTR_CONTENT_TYPE: Final = ATTR_HEADER_PREFIX + "content-type']"
REQUEST_ATTRIBUTES: Final = (ATTR_ROUTE_NAME, ATTR_REQUEST_ID, ATTR_CONTENT_TYPE)
# Response attributes, sent with the response body message on audited routes only (their one response phase).
# The status Envoy is about to send (the model's, or Envoy's own local reply's).
ATTR_RESPONSE_CODE: Final = "response.code"
# The version that served, from the answering upstream host's metadata (see
# `envoy.clusters._endpoints`); absent when no model answered.
ATTR_UPSTREAM_VERSION: Final = f"xds.upstream_host_metadata.filter_metadata['{METADATA_NAMESPACE}']['{META_VERSION}']"
# Route and id again: a request refused by Envoy before the broker's body phase
# (no body) still reaches the response phase, and is audited from these.
RESPONSE_ATTRIBUTES: Final = (ATTR_RESPONSE_CODE, ATTR_UPSTREAM_VERSION, ATTR_ROUTE_NAME, ATTR_REQUEST_ID)
# The key under which Envoy files the attributes in `ProcessingRequest.attributes`.
ATTRIBUTES_FILTER_KEY: Final = "envoy.filters.http.ext_proc"

# Every header under this prefix is the broker's: Envoy removes the client's copies first
# (open mode included), so a model can trust the consumer, sticky key, shadow tag and parent id.
BROKER_HEADER_PREFIX: Final = "x-broker-"
# Response headers added by Envoy (never by the model, never by the client).
HEADER_MODEL: Final = "x-broker-model"
# Which version actually served: read by Envoy from the answering host's metadata.
HEADER_VERSION: Final = "x-broker-version"
# Present, with the reason, when a fail-open model answered without features.
HEADER_DEGRADED: Final = "x-broker-degraded"
HEADER_SERVER_TIMING: Final = "server-timing"
# Request header Envoy hashes to pick a version on sticky routes (`sticky.body_field`); set
# by the broker from the body in the body phase, overwriting any client copy.
HEADER_STICKY_KEY: Final = "x-broker-sticky-key"
HEADER_REQUEST_ID: Final = "x-request-id"

# Request headers of the authentication filter. The client's API key; removed
# before anything goes upstream, so no model ever sees it.
HEADER_API_KEY: Final = "x-api-key"
# The verified consumer, for the model; Envoy removes any client copy first.
HEADER_CONSUMER: Final = "x-broker-consumer"

# Route names: a model route is named after the model; the broker's own
# endpoints carry a prefix no model name can have (model names are DNS labels).
ROUTE_HEALTHZ: Final = "broker:healthz"
ROUTE_MODELS: Final = "broker:models"
# Ground truth for audited answers: Envoy authenticates it, then forwards it to the control plane.
ROUTE_FEEDBACK: Final = "broker:feedback"

# The Open Inference Protocol's server endpoints, answered by the broker itself.
ROUTE_OIP_LIVE: Final = "broker:v2-live"
ROUTE_OIP_READY: Final = "broker:v2-ready"
ROUTE_OIP_SERVER: Final = "broker:v2"
PATH_OIP_LIVE: Final = "/v2/health/live"
PATH_OIP_READY: Final = "/v2/health/ready"
PATH_OIP_SERVER: Final = "/v2"

# Path the broker's own GET endpoints are served on, through Envoy.
PATH_HEALTHZ: Final = "/healthz"
PATH_MODELS: Final = "/models"
PATH_FEEDBACK: Final = "/v1/feedback"

# Sent by the broker with every ensemble member call, so a member's audit record and
# logs link back to the client's request (Envoy gives each member call its own x-request-id).
HEADER_PARENT_REQUEST_ID: Final = "x-broker-parent-request-id"

# The ext_proc gRPC cluster in the generated Envoy config.
EXT_PROC_CLUSTER: Final = "model_broker_ext_proc"
# The same workers over ext_proc's `http_service` (HTTP/1.1), and the path Envoy POSTs each message to.
EXT_PROC_HTTP_CLUSTER: Final = "model_broker_ext_proc_http"
HTTP_SERVICE_PATH: Final = "/ext_proc"
# Envoy's `http_service` client never retries: a model route's messages go through this internal
# listener (and a cluster of the same name), whose route retries a message no worker answered.
EXT_PROC_RETRY_LISTENER: Final = "model_broker_ext_proc_retry"


def broker_socket(directory: str, transport: str, worker: int) -> str:
    """Unix socket of worker `worker` (0-based) for `transport` ("grpc" or "http"), where Envoy shares the host."""
    return f"{directory.rstrip('/')}/{transport}-{worker}.sock"


# The rollout control plane: its gRPC cluster, the RTDS layer every Envoy subscribes
# to, and the runtime key prefix of `weighted_clusters` (key = prefix + "." + cluster).
CONTROL_PLANE_CLUSTER: Final = "model_broker_control_plane"
# The control plane's feedback listener (HTTP/1.1), behind the public `/v1/feedback` route.
FEEDBACK_CLUSTER: Final = "model_broker_feedback"
RUNTIME_LAYER: Final = "model_broker_weights"
# The xDS node cluster broker workers subscribe to RTDS under; every other node is an Envoy.
BROKER_NODE_CLUSTER: Final = "model-broker-workers"
RUNTIME_WEIGHTS_PREFIX: Final = "model_broker.weights"

# Shadow traffic: Envoy mirrors a shadowed model's enriched request to an internal listener
# (named here, reached through a cluster of the same name), which routes it to the shadow
# version by the header the mirror policy sets; the route is named SHADOW_ROUTE_PREFIX + model.
SHADOW_LISTENER: Final = "model_broker_shadow"
HEADER_SHADOW_OF: Final = "x-broker-shadow-of"
SHADOW_ROUTE_PREFIX: Final = "shadow:"
# The second ext_proc filter: observes (never changes) the primary's and the shadow's answers
# and streams them to the control plane, which pairs them by request id.
SHADOW_RECORDER_FILTER: Final = "model_broker.shadow_recorder"
RECORDER_ATTRIBUTES: Final = (ATTR_ROUTE_NAME, ATTR_UPSTREAM_VERSION, ATTR_REQUEST_ID)


def header_attribute(header: str) -> str:
    """The request attribute that carries one request header (a route asks for it by this name)."""
    return f"{ATTR_HEADER_PREFIX}{header}']"


def weight_runtime_key(model: str, version: str) -> str:
    """The runtime key Envoy reads a version's live weight from."""
    return f"{RUNTIME_WEIGHTS_PREFIX}.{version_cluster(model, version)}"


def ensemble_route(ensemble: str) -> str:
    """Route name of an ensemble's public route; never a model name (those are DNS labels)."""
    return f"ensemble:{ensemble}"


def oip_route(kind: str, model: str, version: str | None = None) -> str:
    """Route name of an OIP model's GET endpoint (`metadata` or `ready`), for the model or one version,
    or of one version's own `infer` route (`…/versions/<v>/infer`, outside the split)."""
    return f"oip-{kind}:{model}" + (f"/{version}" if version is not None else "")


def oip_route_model(route_name: str) -> str | None:
    """The model an OIP GET or version `infer` route belongs to (what a consumer's allow-list names), or None."""
    if not route_name.startswith("oip-"):
        return None
    return route_name.partition(":")[2].partition("/")[0] or None


def egress_route(model: str) -> str:
    """Route name of a model on the egress listener the broker calls ensemble members through."""
    return f"egress:{model}"


def version_cluster(model: str, version: str) -> str:
    """Envoy cluster name of one model version."""
    return f"{model}--{version}"
