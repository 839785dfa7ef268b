"""Envoy for Open Inference Protocol models: the V2 routes, the backends' path rewrite, OIP-shaped errors.

For each `open_inference` model: `POST /v2/models/<m>/infer` (the weighted split, the
model route proper), `POST …/versions/<v>/infer` (that version only, outside the split),
`GET /v2/models/<m>[/versions/<v>][/ready]` (answered by the broker from the backends,
read through the egress listener), and OIP-shaped refusals for unknown versions, wrong
methods and the binary tensor extension. Server routes (`/v2`, `/v2/health/*`) are the broker's.
"""

from __future__ import annotations

import json

from envoy_data_plane.envoy.config.core.v3 import SubstitutionFormatString
from envoy_data_plane.envoy.config.route.v3 import (
    DirectResponseAction,
    HeaderMatcher,
    Route,
    RouteAction,
    RouteMatch,
)
from envoy_data_plane.envoy.type.matcher.v3 import StringMatcher
from envoy_data_plane.google.protobuf import Struct

from extproc import wire
from extproc.envoy.common import _header, _ms
from extproc.envoy.ext_proc import _header_phase_only, _without_broker, over_http
from extproc.registry import BACKEND_INFER_SUFFIX, V2_PREFIX, Model, Registry

# tritonclient sends this header (and binary tensors after the JSON) when any input uses binary data.
BINARY_HEADER = "inference-header-content-length"
# Local replies on these paths take OIP's error shape (CEL, evaluated by Envoy's local-reply mappers).
OIP_PATHS = f"request.path.startsWith('{V2_PREFIX}')"


def oip_error_json(code: str, message: str) -> SubstitutionFormatString:
    """OIP's error body, `{"error": "<code>: <message>"}`; the request id is in x-request-id."""
    return SubstitutionFormatString(
        json_format=Struct.from_dict({"error": f"{code}: {message}"}), content_type="application/json"
    )


def _refuse(status: int, code: str, message: str) -> DirectResponseAction:
    return DirectResponseAction(status=status, body_format=oip_error_json(code, message))


def _refusal(name: str, match: RouteMatch, status: int, code: str, message: str) -> Route:
    """A route Envoy answers alone, in OIP's error shape, without a broker call."""
    return Route(
        name=name,
        match=match,
        direct_response=_refuse(status, code, message),
        typed_per_filter_config=_without_broker(),
    )


def _get(path: str) -> RouteMatch:
    return RouteMatch(path=path, headers=[HeaderMatcher(name=":method", string_match=StringMatcher(exact="GET"))])


def _broker_answers(name: str, match: RouteMatch, http: bool) -> Route:
    """A GET the broker answers in its header phase (reached only if it did not); `http`: over `http_service`."""
    return Route(
        name=name,
        match=match,
        direct_response=_refuse(503, "broker_unavailable", "the model broker did not answer"),
        typed_per_filter_config=_header_phase_only(http),
    )


def server_routes(registry: Registry) -> list[Route]:
    """`/v2/health/live`, `/v2/health/ready`, `/v2`, and the binary extension refused before any model route."""
    if not any(m.protocol == "open_inference" for m in registry.models):
        return []
    binary = _refusal(
        "oip:binary",
        RouteMatch(prefix=f"{V2_PREFIX}/models/", headers=[HeaderMatcher(name=BINARY_HEADER, present_match=True)]),
        415,
        "unsupported_media_type",
        "binary tensor data (Inference-Header-Content-Length) is not supported; "
        "send JSON tensors (tritonclient: binary_data=False)",
    )
    http = over_http(registry)
    return [
        _broker_answers(wire.ROUTE_OIP_LIVE, _get(wire.PATH_OIP_LIVE), http),
        _broker_answers(wire.ROUTE_OIP_READY, _get(wire.PATH_OIP_READY), http),
        _broker_answers(wire.ROUTE_OIP_SERVER, _get(wire.PATH_OIP_SERVER), http),
        binary,
    ]


def catch_all() -> Route:
    """Anything else under /v2: OIP's 404, before the broker's own (JSON) catch-all."""
    return _refusal(
        "oip:unknown", RouteMatch(prefix=V2_PREFIX), 404, "unknown_model", "no model is served at this path"
    )


def model_routes(model: Model, served: Route, http: bool) -> list[Route]:
    """`served` is the model's infer route (the split); around it, the rest of the model's V2 paths."""
    base = f"{V2_PREFIX}/models/{model.name}"
    assert served.match is not None  # built with one; the generated classes type every field optional
    routes = [served]
    pinned_filters = {k: v for k, v in served.typed_per_filter_config.items() if k != wire.SHADOW_RECORDER_FILTER}
    for version in model.versions:
        # Outside the split: no weights, no sticky hash, no shadow copy, no segment rules (its own
        # name tells the broker the version is named); the same broker phase.
        routes.append(
            Route(
                name=wire.oip_route("infer", model.name, version.name),
                match=RouteMatch(path=f"{base}/versions/{version.name}/infer", headers=served.match.headers),
                typed_per_filter_config=dict(pinned_filters),
                route=RouteAction(
                    cluster=wire.version_cluster(model.name, version.name), timeout=_ms(model.timeout_ms)
                ),
                response_headers_to_add=list(served.response_headers_to_add),
            )
        )
    for named in (None, *(v.name for v in model.versions)):
        path = base if named is None else f"{base}/versions/{named}"
        routes.append(_broker_answers(wire.oip_route("metadata", model.name, named), _get(path), http))
        routes.append(_broker_answers(wire.oip_route("ready", model.name, named), _get(path + "/ready"), http))
    known = ", ".join(v.name for v in model.versions)
    routes.append(
        _refusal(
            f"{model.name}:unknown-version",
            RouteMatch(prefix=f"{base}/versions/"),
            404,
            "unknown_version",
            f"{model.name} has no such version (versions: {known})",
        )
    )
    method = _refusal(
        f"{model.name}:method",
        RouteMatch(path=f"{base}/infer"),
        405,
        "method_not_allowed",
        f"{base}/infer accepts POST only",
    )
    method.response_headers_to_add = [_header("allow", "POST")]
    routes.append(method)
    return routes


def egress_routes(model: Model) -> list[Route]:
    """Each version's metadata and readiness on the egress listener (the broker reads them there)."""
    routes = []
    for version in model.versions:
        path = f"{V2_PREFIX}/models/{model.name}/versions/{version.name}"
        for suffix in ("", "/ready"):
            routes.append(
                Route(
                    name=wire.egress_route(f"{model.name}/{version.name}{suffix}"),
                    match=_get(path + suffix),
                    route=RouteAction(cluster=wire.version_cluster(model.name, version.name), timeout=_ms(2000)),
                    typed_per_filter_config=_without_broker(),
                )
            )
    return routes


def path_rewrite_lua(infer_path: str) -> str:
    """An OIP backend's paths from its infer path: `…/infer`, `…/ready` and metadata (no suffix).

    Envoy forbids `:path` in header mutations and rewrites per route, not per version, so each
    version's cluster rewrites its own; the suffix of the incoming path says which endpoint.
    """
    base = json.dumps(infer_path.removesuffix(BACKEND_INFER_SUFFIX))
    return (
        "function envoy_on_request(h)\n"
        "  local p = h:headers():get(':path')\n"
        f"  if p:sub(-6) == '/infer' then h:headers():replace(':path', {base} .. '/infer')\n"
        f"  elseif p:sub(-6) == '/ready' then h:headers():replace(':path', {base} .. '/ready')\n"
        f"  else h:headers():replace(':path', {base}) end\n"
        "end"
    )
