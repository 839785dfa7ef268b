"""Envoy's own answers (no route, auth failures, broker down) in the broker's JSON error shape."""

from __future__ import annotations

from envoy_data_plane.envoy.config.accesslog.v3 import (
    AccessLogFilter,
    ExtensionFilter,
)
from envoy_data_plane.envoy.config.core.v3 import (
    SubstitutionFormatString,
)
from envoy_data_plane.envoy.config.route.v3 import (
    DirectResponseAction,
)
from envoy_data_plane.envoy.extensions.access_loggers.filters.cel.v3 import ExpressionFilter
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    LocalReplyConfig,
    ResponseMapper,
)
from envoy_data_plane.google.protobuf import Struct

from extproc import wire
from extproc.envoy.auth import retry_after_seconds
from extproc.envoy.common import FORBIDDEN_POLICY, NOT_BROKER, _any, _header
from extproc.envoy.edge import OVERLOAD_DETAILS
from extproc.envoy.open_inference import OIP_PATHS, oip_error_json
from extproc.registry import Registry


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


def _mapper(condition: str, status: int, code: str, message: str, oip: bool) -> ResponseMapper:
    """On V2 paths (`oip`) in OIP's error shape, elsewhere in the broker's."""
    where = f"{OIP_PATHS} && " if oip else ""
    return ResponseMapper(
        filter=_cel(f"{where}{NOT_BROKER} && ({condition})"),
        status_code=status,
        body_format_override=oip_error_json(code, message) if oip else _error_json(code, message),
    )


def _auth_mappers(unauthenticated_retry_after: int, oip: bool) -> list[ResponseMapper]:
    """401/403/429 from the authentication, authorization and rate-limit filters."""
    too_many = _mapper(
        "response.code_details == 'local_rate_limited'",
        429,
        "rate_limited",
        "too many requests for this consumer; retry after the number of seconds in retry-after",
        oip,
    )
    # Per consumer, set by the authentication filter: the rate-limit filter's own
    # x-ratelimit-reset is added after local_reply_config runs, so it cannot be copied.
    retry_after = f"%DYNAMIC_METADATA({wire.AUTH_NAMESPACE}:{wire.META_RETRY_AFTER})%"
    too_many.headers_to_add = [_header("retry-after", retry_after)]
    # The guard before authentication (`unauthenticated.lua`): this address failed too often.
    failing = _mapper(
        "response.code == 429",
        429,
        "rate_limited",
        "too many requests without a valid credential from this address; retry after retry-after seconds",
        oip,
    )
    failing.headers_to_add = [_header("retry-after", str(unauthenticated_retry_after))]
    return [
        _mapper(
            # jwt_authn answers a token for another audience with 403: still not authenticated here.
            "response.code == 401 || response.code_details.startsWith('jwt_authn_access_denied')",
            401,
            "unauthenticated",
            f"send a valid API key in {wire.HEADER_API_KEY} or a valid bearer token in authorization",
            oip,
        ),
        _mapper(
            f"response.code_details == 'rbac_access_denied_matched_policy[{FORBIDDEN_POLICY}]'",
            403,
            "forbidden",
            "this consumer may not call this route",
            oip,
        ),
        too_many,
        failing,
    ]


OVERLOADED = "the service is overloaded; retry after the number of seconds in retry-after"


def _overload_mappers(retry_after: int, oip: bool) -> list[ResponseMapper]:
    """Envoy shedding load: the overload manager, or the ext_proc cluster's circuit breaker.

    A circuit-breaker overflow is a busy broker, not a missing one: it must not read
    `broker_unavailable` (an operator would look for a dead process).
    """
    overflow = "response.code_details.startsWith('ext_proc') && response.code_details.contains('overflow')"
    mappers = [
        _mapper(f"response.code_details == '{OVERLOAD_DETAILS}'", 503, "overloaded", OVERLOADED, oip),
        _mapper(overflow, 503, "overloaded", OVERLOADED, oip),
    ]
    for mapper in mappers:
        mapper.headers_to_add = [_header("retry-after", str(retry_after))]
    return mappers


def local_reply_config(registry: Registry, oip: bool = False) -> LocalReplyConfig:
    """Envoy's own replies (body too large, broker down, model down, overload) as JSON, details hidden;
    with `oip` (Open Inference Protocol models served), in OIP's shape on V2 paths."""
    return LocalReplyConfig(mappers=[*(_mappers(registry, oip=True) if oip else []), *_mappers(registry, oip=False)])


def _mappers(registry: Registry, oip: bool) -> list[ResponseMapper]:
    unauthenticated = retry_after_seconds(registry.limits.unauthenticated)
    return [
        *(_auth_mappers(unauthenticated, oip) if registry.consumers else []),
        *_overload_mappers(registry.overload.retry_after_seconds, oip),
        _mapper("response.code == 413", 413, "body_too_large", "the request body is too large", oip),
        _mapper("response.code == 408", 408, "request_timeout", "the request did not arrive in time", oip),
        _mapper("response.code == 431", 431, "headers_too_large", "the request headers are too many or too large", oip),
        _mapper(
            "response.code_details.startsWith('rbac_access_denied')",
            400,
            "invalid_json",
            "the request body is empty; send a JSON object",
            oip,
        ),
        _mapper(
            "response.code_details.startsWith('ext_proc')",
            503,
            "broker_unavailable",
            "the model broker is unavailable; try again shortly",
            oip,
        ),
        _mapper("response.code == 504", 504, "upstream_timeout", "the model did not answer in time", oip),
        _mapper(
            "response.code >= 500", 503, "upstream_unavailable", "the model is unavailable; try again shortly", oip
        ),
        _mapper("response.code >= 400", 400, "bad_request", "the request could not be processed", oip),
    ]
