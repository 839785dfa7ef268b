"""The ext_proc filters and, per route, which phases Envoy sends the broker and over which transport.

Two transports reach the same processor: gRPC (one stream per request) and ext_proc's
`http_service` (one HTTP/1.1 POST of JSON per message; `broker.transport`). Envoy 1.40
refuses a body mode on an `http_service` filter, but applies a per-route override asking
for the buffered body: the HTTP filters are off in the chain and each route on that transport
switches one on with that override (and the gRPC one off). `extproc.process.fast_path`
checks at start that the Envoy in use still does this. Audited routes take it too, their
audit draft carried by Envoy between their two calls; sticky-by-body routes stay on gRPC,
where one stream carries their header phase's answer to their body phase.
"""

from __future__ import annotations

from envoy_data_plane.envoy.config.core.v3 import (
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HttpService,
    HttpUri,
)
from envoy_data_plane.envoy.config.route.v3 import (
    FilterConfig,
    RouteActionHashPolicy,
    RouteActionHashPolicyHeader,
)
from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import (
    ExternalProcessor,
    ExtProcHttpService,
    ExtProcOverrides,
    ExtProcPerRoute,
    MetadataOptions,
    MetadataOptionsMetadataNamespaces,
    ProcessingMode,
)
from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import ProcessingModeBodySendMode as Body
from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import ProcessingModeHeaderSendMode as Send
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpFilter,
)
from envoy_data_plane.envoy.type.v3 import (
    HttpStatus,
    StatusCode,
)
from envoy_data_plane.google.protobuf import Any as AnyMessage

from extproc import wire
from extproc.envoy.audit_hold import audit_hold_on
from extproc.envoy.common import (
    AUDIT_HOLD_FILTER,
    DYNAMIC_ENSEMBLE_DEADLINE_MS,
    ENSEMBLE_EXT_PROC_FILTER,
    EXT_PROC_FILTER,
    HTTP_ENSEMBLE_EXT_PROC_FILTER,
    HTTP_EXT_PROC_FILTER,
    _any,
    _ms,
)
from extproc.envoy.edge import stream_retry
from extproc.envoy.retry_hop import ENSEMBLE_PATH
from extproc.envoy.shadow import _recorder_on
from extproc.registry import (
    Model,
    Registry,
)


def over_http(registry: Registry) -> bool:
    """Single-message routes use `http_service`: `http`, or `auto` (settled by the probe before generation)."""
    return registry.broker.transport != "grpc"


def ext_proc_filter(registry: Registry, dynamic: bool = False) -> HttpFilter:
    config = _ext_proc(registry, registry.broker.message_timeout_ms, dynamic, retry=registry.broker.retry_unanswered)
    return HttpFilter(name=EXT_PROC_FILTER, typed_config=_any(config))


def _ensemble_timeout_ms(registry: Registry, dynamic: bool) -> int:
    """The broker answers an ensemble by its deadline at the latest; the message timeout adds
    the broker's own budget on top, so Envoy never cuts it short."""
    deadlines = [e.deadline_ms for e in registry.ensembles]
    if dynamic:
        deadlines.append(DYNAMIC_ENSEMBLE_DEADLINE_MS)
    return max(deadlines) + registry.broker.message_timeout_ms


def ensemble_ext_proc_filter(registry: Registry, dynamic: bool = False) -> HttpFilter:
    """Off in the chain, on per ensemble route: the model routes keep their short message timeout."""
    config = _ext_proc(registry, _ensemble_timeout_ms(registry, dynamic), dynamic)
    config.stat_prefix = "ensemble"
    return HttpFilter(name=ENSEMBLE_EXT_PROC_FILTER, typed_config=_any(config), disabled=True)


def http_ext_proc_filters(registry: Registry, dynamic: bool = False) -> list[HttpFilter]:
    """The `http_service` twins of the filters above, off in the chain; none on `transport: grpc`."""
    if not over_http(registry):
        return []
    audited = audits_any(registry, dynamic)
    model = _http_ext_proc(registry, registry.broker.message_timeout_ms, wire.HTTP_SERVICE_PATH, audited=audited)
    filters = [HttpFilter(name=HTTP_EXT_PROC_FILTER, typed_config=_any(model), disabled=True)]
    if registry.ensembles or dynamic:
        hop = registry.broker.retry_unanswered
        path = ENSEMBLE_PATH if hop else wire.HTTP_SERVICE_PATH
        ensemble = _http_ext_proc(registry, _ensemble_timeout_ms(registry, dynamic), path, audited=False)
        ensemble.stat_prefix = "ensemble"
        filters.append(HttpFilter(name=HTTP_ENSEMBLE_EXT_PROC_FILTER, typed_config=_any(ensemble), disabled=True))
    return filters


def audits_any(registry: Registry, dynamic: bool) -> bool:
    """Whether some route may be audited; in dynamic mode any model may become audited without a new listener."""
    return registry.audit is not None if dynamic else any(registry.audited(m) for m in registry.models)


def _ext_proc(
    registry: Registry, timeout_ms: int, dynamic: bool, retry: bool = False, carry_draft: bool = False
) -> ExternalProcessor:
    """`retry`: a stream whose worker died before answering goes to another one (`edge.stream_retry`);
    model routes only, an ensemble's message calls models and is never sent twice. `carry_draft`:
    the broker's own namespace goes back to it, with the audit draft (`audit.carried`)."""
    audited = audits_any(registry, dynamic)
    # The verified consumer, for the request context (audit, metrics).
    forwarded = [wire.AUTH_NAMESPACE] if registry.consumers else []
    forwarded += [wire.METADATA_NAMESPACE] if carry_draft else []
    return ExternalProcessor(
        grpc_service=GrpcService(
            envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=wire.EXT_PROC_CLUSTER),
            timeout=_ms(timeout_ms),
            retry_policy=stream_retry() if retry else None,
        ),
        # Fail closed: a request the broker never saw must not reach a model unenriched.
        failure_mode_allow=False,
        # One message per request: the buffered body. Header and response phases
        # are asked for per route, only where a feature needs them.
        processing_mode=_body_mode(response_headers=Send.SKIP, response_body=Body.NONE),
        message_timeout=_ms(timeout_ms),
        request_attributes=request_attributes(registry),
        # Read on audited routes only (the only ones with a response phase).
        response_attributes=list(wire.RESPONSE_ATTRIBUTES) if audited else [],
        metadata_options=MetadataOptions(
            receiving_namespaces=MetadataOptionsMetadataNamespaces(untyped=[wire.METADATA_NAMESPACE]),
            forwarding_namespaces=MetadataOptionsMetadataNamespaces(untyped=forwarded) if forwarded else None,
        ),
        status_on_error=HttpStatus(code=StatusCode.ServiceUnavailable),
    )


def _http_ext_proc(registry: Registry, timeout_ms: int, path: str, *, audited: bool) -> ExternalProcessor:
    """Every phase skipped at filter level (Envoy refuses body modes here); routes ask per route.

    With `broker.retry_unanswered`, through the retry hop (`retry_hop`), on `path`: it retries
    model messages, not ensemble ones; else straight to the workers. `audited`: some route
    has a response phase, which gets its attributes and the request phase's audit draft.
    """
    config = _ext_proc(registry, timeout_ms, dynamic=False, carry_draft=audited)
    config.grpc_service = None
    config.http_service = ExtProcHttpService(
        http_service=HttpService(
            http_uri=HttpUri(
                uri=f"http://model-broker{path}",
                cluster=wire.EXT_PROC_RETRY_LISTENER
                if registry.broker.retry_unanswered
                else wire.EXT_PROC_HTTP_CLUSTER,
                timeout=_ms(timeout_ms),
            )
        )
    )
    config.processing_mode = ProcessingMode(
        request_header_mode=Send.SKIP,
        request_body_mode=Body.NONE,
        response_header_mode=Send.SKIP,
        response_body_mode=Body.NONE,
        request_trailer_mode=Send.SKIP,
        response_trailer_mode=Send.SKIP,
    )
    config.response_attributes = list(wire.RESPONSE_ATTRIBUTES) if audited else []
    return config


def _header_phase_only(http: bool) -> dict[str, AnyMessage]:
    """The broker's own GET routes: headers to the broker, which answers immediately."""
    mode = ProcessingMode(request_header_mode=Send.SEND, request_body_mode=Body.NONE, response_header_mode=Send.SKIP)
    return on_transport(mode, http=http)


def body_only() -> ProcessingMode:
    """The hot path: the buffered request body, nothing else."""
    return _body_mode(response_headers=Send.SKIP, response_body=Body.NONE)


def on_transport(mode: ProcessingMode, *, http: bool, ensemble: bool = False) -> dict[str, AnyMessage]:
    """Per-route settings of a route whose phases need no stream between them: `mode` on the filter of its transport.

    An override is needed even where `mode` is a filter's own: Envoy switches a
    chain-disabled filter on only with a per-route config.
    """
    override = _any(ExtProcPerRoute(overrides=ExtProcOverrides(processing_mode=mode)))
    target = {
        (False, False): EXT_PROC_FILTER,
        (False, True): ENSEMBLE_EXT_PROC_FILTER,
        (True, False): HTTP_EXT_PROC_FILTER,
        (True, True): HTTP_ENSEMBLE_EXT_PROC_FILTER,
    }[(http, ensemble)]
    if target == EXT_PROC_FILTER:
        return {EXT_PROC_FILTER: override}
    return {
        EXT_PROC_FILTER: _any(ExtProcPerRoute(disabled=True)),
        target: _any(FilterConfig(config=override, disabled=False)),
    }


def _without_broker() -> dict[str, AnyMessage]:
    """Routes Envoy answers alone (unknown path, wrong method) never cost a broker call."""
    return {EXT_PROC_FILTER: _any(ExtProcPerRoute(disabled=True))}


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


def _model_mode(model: Model, audited: bool) -> ProcessingMode:
    """The broker phases of a model route: the buffered request body, and more where a feature needs it.

    Audited routes add the buffered response body, with status and version as its
    attributes; `audit_hold` keeps the response headers from leaving before the broker
    answers it. Sticky-by-body routes add the request header phase: Envoy drops the
    body phase's header mutation otherwise.
    """
    mode = _body_mode(response_headers=Send.SKIP, response_body=Body.BUFFERED if audited else Body.NONE)
    if _sticky_by_body(model):
        mode.request_header_mode = Send.SEND
    return mode


def _sticky_by_body(model: Model) -> bool:
    return model.sticky is not None and model.sticky.body_field is not None


def request_attributes(registry: Registry) -> list[str]:
    """What every request carries to the broker, the headers OIP models take entity keys from, and the
    sticky headers of models with rules.

    In the filter, not per route: Envoy 1.40 ignores a route's `request_attributes` override
    (measured). A header attribute is sent only when the request has that header.
    """
    keys = [m.open_inference.entity_key for m in registry.models if m.open_inference is not None]
    headers = [k.header for k in keys if k is not None and k.header is not None]
    # Sticky-by-header models with a rule's sub-split: the broker hashes the same key Envoy does.
    headers += [m.sticky.header for m in registry.models if m.sticky is not None and m.sticky.header and m.rules]
    return [*wire.REQUEST_ATTRIBUTES, *(wire.header_attribute(h) for h in dict.fromkeys(headers))]


def _hash_policy(model: Model) -> list[RouteActionHashPolicy]:
    """The header Envoy hashes to pick a version of a sticky model: the client's own (`sticky.header`),
    or the one the broker sets from the body (`sticky.body_field`)."""
    if model.sticky is None:
        return []
    header = model.sticky.header or wire.HEADER_STICKY_KEY
    return [RouteActionHashPolicy(header=RouteActionHashPolicyHeader(header_name=header))]


def _model_filters(model: Model, audited: bool, http: bool) -> dict[str, AnyMessage]:
    """Per-route filter settings of the public model route: broker phases, the audit hold, shadow recording.

    Audited routes take `http_service` too: their two calls may reach different workers, so
    the request phase's draft travels in Envoy's dynamic metadata (`audit.carried`).
    Sticky-by-body routes keep one gRPC stream: their header phase's answer must meet
    their body phase in one worker.
    """
    filters: dict[str, AnyMessage] = {}
    mode, sticky = _model_mode(model, audited), _sticky_by_body(model)
    if http and not sticky:
        filters.update(on_transport(mode, http=True))
    elif audited or sticky:
        # An override replaces the whole processing mode, so every field is spelled out.
        filters[EXT_PROC_FILTER] = _any(ExtProcPerRoute(overrides=ExtProcOverrides(processing_mode=mode)))
    if audited:
        filters[AUDIT_HOLD_FILTER] = audit_hold_on()
    if model.shadow is not None:
        filters[wire.SHADOW_RECORDER_FILTER] = _recorder_on()
    return filters
