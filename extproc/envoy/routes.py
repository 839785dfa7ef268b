"""Routes: one per model (weighted clusters), ensembles, the egress routes and the admin endpoints."""

from __future__ import annotations

from datetime import timedelta

from envoy_data_plane.envoy.config.core.v3 import (
    HeaderValueOption,
)
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
    HeaderMatcher,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
    WeightedCluster,
    WeightedClusterClusterWeight,
)
from envoy_data_plane.envoy.extensions.filters.http.jwt_authn.v3 import (
    PerRouteConfig,
)
from envoy_data_plane.envoy.extensions.filters.http.lua.v3 import LuaPerRoute
from envoy_data_plane.envoy.extensions.filters.http.rbac.v3 import Rbac, RbacPerRoute
from envoy_data_plane.envoy.type.matcher.v3 import (
    MetadataMatcher,
    MetadataMatcherPathSegment,
    RegexMatchAndSubstitute,
    RegexMatcher,
    StringMatcher,
    ValueMatcher,
)

from extproc import wire
from extproc.envoy.clusters import shared_path
from extproc.envoy.common import (
    AUTHZ_FILTER,
    EGRESS_ROUTES,
    FORBIDDEN_POLICY,
    JWT_FILTER,
    LUA_FILTER,
    PUBLIC_ROUTES,
    RBAC_FILTER,
    SAGEMAKER_TARGET_VARIANT,
    _any,
    _header,
    _ms,
)
from extproc.envoy.ext_proc import (
    _hash_policy,
    _header_phase_only,
    _model_filters,
    _without_broker,
    body_only,
    on_transport,
    over_http,
)
from extproc.envoy.local_replies import _direct
from extproc.envoy.open_inference import catch_all, egress_routes, model_routes, server_routes
from extproc.envoy.shadow import _mirror
from extproc.registry import (
    Ensemble,
    Model,
    Registry,
    Version,
)


def _broker_route(name: str, path: str, http: bool) -> Route:
    return Route(
        name=name,
        match=RouteMatch(path=path),
        # Reached only if the broker let the request through, which it never does here.
        direct_response=_direct(503, "broker_unavailable", "the model broker did not answer"),
        typed_per_filter_config=_header_phase_only(http),
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
        # One path for all versions: rewrite on the route; else each cluster rewrites its own
        # (always for OIP models, whose clusters also serve metadata and readiness).
        regex_rewrite=_rewrite_to(path) if (path := shared_path(model)) and model.protocol == "json" else None,
    )


def _version_header() -> HeaderValueOption:
    # From the metadata of the upstream host that answered: absent when no model did.
    return _header(wire.HEADER_VERSION, f"%UPSTREAM_METADATA({wire.METADATA_NAMESPACE}:{wire.META_VERSION})%")


def _feedback_routes() -> list[Route]:
    """Ground truth: authenticated here like a model call, then answered by the control plane (no broker call)."""
    served = Route(
        name=wire.ROUTE_FEEDBACK,
        match=_post(wire.PATH_FEEDBACK),
        route=RouteAction(cluster=wire.FEEDBACK_CLUSTER, timeout=timedelta(seconds=30)),
        typed_per_filter_config=_without_broker(),
    )
    return [served, _wrong_method(wire.ROUTE_FEEDBACK, wire.PATH_FEEDBACK)]


def _wrong_method(name: str, path: str) -> Route:
    return Route(
        name=f"{name}:method",
        match=RouteMatch(path=path),
        direct_response=_direct(405, "method_not_allowed", f"{path} accepts POST only"),
        typed_per_filter_config=_without_broker(),
        response_headers_to_add=[_header("allow", "POST")],
    )


def _model_routes(model: Model, audited: bool, http: bool) -> list[Route]:
    metadata = f"%DYNAMIC_METADATA({wire.METADATA_NAMESPACE}:{{}})%"
    action = _model_action(model)
    # Mirrored from the public route only: ensemble member calls are not shadowed.
    action.request_mirror_policies = _mirror(model)
    served = Route(
        name=model.name,
        match=_post(model.path),
        typed_per_filter_config={RBAC_FILTER: _any(_broker_approved()), **_model_filters(model, audited, http)},
        route=action,
        response_headers_to_add=[
            _header(wire.HEADER_MODEL, model.name),
            _version_header(),
            _header(wire.HEADER_SERVER_TIMING, metadata.format(wire.META_SERVER_TIMING)),
            _header(wire.HEADER_DEGRADED, metadata.format(wire.META_DEGRADED)),
        ],
    )
    pinned = _pinned_routes(model, served)
    if model.protocol == "open_inference":
        return [*pinned, *model_routes(model, served, http)]
    return [*pinned, served, _wrong_method(model.name, model.path)]


def _pinned_routes(model: Model, served: Route) -> list[Route]:
    """One route per version a segment rule can pin, tried before the weighted one.

    Each matches only once the broker has set `model_broker.pin` to its version (Envoy matches
    again after the broker's body answer clears the route cache) and sends to that version
    alone: no runtime key, so a pin never depends on the version's live weight (the broker
    leaves out versions taken out of traffic). Everything else is the served route's: name (so
    audit, authorization and shadow recording see the model), filters, mirror, headers.
    """
    # The generated classes type every message field optional; `served` is always built with both.
    assert served.match is not None
    assert served.route is not None
    routes = []
    for name in model.rule_versions:
        version = next(v for v in model.versions if v.name == name)
        pin = MetadataMatcher(
            filter=wire.METADATA_NAMESPACE,
            path=[MetadataMatcherPathSegment(key=wire.META_PIN)],
            value=ValueMatcher(string_match=StringMatcher(exact=name)),
        )
        match = RouteMatch(path=served.match.path, headers=served.match.headers, dynamic_metadata=[pin])
        one = WeightedClusterClusterWeight(
            name=wire.version_cluster(model.name, name), weight=1, request_headers_to_add=_target_variant(version)
        )
        action = RouteAction(
            weighted_clusters=WeightedCluster(clusters=[one]),
            timeout=served.route.timeout,
            regex_rewrite=served.route.regex_rewrite,
            request_mirror_policies=served.route.request_mirror_policies,
        )
        routes.append(
            Route(
                name=served.name,
                match=match,
                typed_per_filter_config=dict(served.typed_per_filter_config),
                route=action,
                response_headers_to_add=served.response_headers_to_add,
            )
        )
    return routes


def _ensemble_routes(ensemble: Ensemble, http: bool) -> list[Route]:
    """The body goes to the broker (through the ensemble ext_proc), which always answers it itself."""
    name = wire.ensemble_route(ensemble.name)
    served = Route(
        name=name,
        match=_post(ensemble.path),
        # Reached only if the broker let the request through, which it never does here.
        direct_response=_direct(503, "broker_unavailable", "the model broker did not answer"),
        typed_per_filter_config={
            **on_transport(body_only(), http=http, ensemble=True),
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
    for model in registry.models:
        if model.protocol == "open_inference":
            routes += egress_routes(model)
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
    http = over_http(registry)
    routes = [_broker_route(wire.ROUTE_HEALTHZ, wire.PATH_HEALTHZ, http)]
    if registry.admin_endpoints_public:
        routes.append(_broker_route(wire.ROUTE_MODELS, wire.PATH_MODELS, http))
    routes += server_routes(registry)
    if registry.takes_feedback:
        routes += _feedback_routes()
    for model in registry.models:
        routes += _model_routes(model, registry.audited(model), http)
    for ensemble in registry.ensembles:
        routes += _ensemble_routes(ensemble, http)
    routes += [catch_all(), _unknown_route()]
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
    # Ground truth from whoever may call a model that takes it (each item is checked against its model).
    takes = [m.name for m in registry.models if m.feedback is not None]
    allowed[wire.ROUTE_FEEDBACK] = [c.name for c in registry.consumers if any(c.may_call(m) for m in takes)]
    for route in routes:
        if route.name == wire.ROUTE_HEALTHZ:
            route.typed_per_filter_config[JWT_FILTER] = _any(PerRouteConfig(disabled=True))
            route.typed_per_filter_config[LUA_FILTER] = _any(LuaPerRoute(disabled=True))
        elif route.name in allowed:
            route.typed_per_filter_config[AUTHZ_FILTER] = _any(_only_consumers(allowed[route.name]))
        elif (model := wire.oip_route_model(route.name)) in allowed:
            # An OIP model's metadata and readiness: whoever may call the model.
            route.typed_per_filter_config[AUTHZ_FILTER] = _any(_only_consumers(allowed[model]))


def _unknown_route() -> Route:
    return Route(
        name="unknown",
        match=RouteMatch(prefix="/"),
        direct_response=_direct(404, "unknown_route", "no model is served at this path; GET /models lists them"),
        typed_per_filter_config=_without_broker(),
    )


def egress_route_configuration(registry: Registry) -> RouteConfiguration:
    return RouteConfiguration(
        name=EGRESS_ROUTES,
        virtual_hosts=[VirtualHost(name="egress", domains=["*"], routes=[*_egress_routes(registry), _unknown_route()])],
    )
