"""Authentication and authorization at the edge: JWT, the Lua API-key filter, RBAC, per-consumer rate limits."""

from __future__ import annotations

import json
import math
from datetime import timedelta
from urllib.parse import urlsplit

from envoy_data_plane.envoy.config.core.v3 import (
    DataSource,
    HttpUri,
    RuntimeFractionalPercent,
)
from envoy_data_plane.envoy.config.route.v3 import (
    RateLimit as RateLimitConfig,
)
from envoy_data_plane.envoy.config.route.v3 import (
    RateLimitAction,
    RateLimitActionMetaData,
    RateLimitActionMetaDataSource,
    RouteMatch,
)
from envoy_data_plane.envoy.extensions.common.ratelimit.v3 import (
    LocalRateLimitDescriptor,
    RateLimitDescriptorEntry,
    XRateLimitHeadersRfcVersion,
)
from envoy_data_plane.envoy.extensions.filters.http.jwt_authn.v3 import (
    JwksAsyncFetch,
    JwtAuthentication,
    JwtProvider,
    JwtRequirement,
    JwtRequirementOrList,
    RemoteJwks,
    RequirementRule,
)
from envoy_data_plane.envoy.extensions.filters.http.local_ratelimit.v3 import LocalRateLimit
from envoy_data_plane.envoy.extensions.filters.http.lua.v3 import Lua
from envoy_data_plane.envoy.extensions.filters.http.rbac.v3 import Rbac
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpFilter,
)
from envoy_data_plane.envoy.type.matcher.v3 import (
    StringMatcher,
)
from envoy_data_plane.envoy.type.metadata.v3 import MetadataKey, MetadataKeyPathSegment
from envoy_data_plane.envoy.type.v3 import (
    FractionalPercent,
    FractionalPercentDenominatorType,
    TokenBucket,
)
from envoy_data_plane.google.protobuf import Empty

from extproc import wire
from extproc.envoy.common import (
    AUTHENTICATE_LUA,
    AUTHZ_FILTER,
    GUARD_FILTER,
    JWT_FILTER,
    LUA_FILTER,
    RATE_LIMIT_KEY,
    UNAUTHENTICATED_LUA,
    _any,
    _ms,
)
from extproc.registry import (
    Consumer,
    RateLimit,
    Registry,
)


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
        # A token without `exp`, or valid for longer than this, is refused (401).
        require_expiration=True,
        max_lifetime=timedelta(seconds=jwt.max_lifetime_seconds),
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


def unauthenticated_guard(limit: RateLimit) -> HttpFilter:
    """First of the auth filters: an address that keeps failing authentication gets 429 before any
    signature check or key hash (`unauthenticated.lua`)."""
    settings = {
        "RATE": repr(limit.requests / limit.seconds),
        "BURST": str(limit.burst or limit.requests),
        "RETRY_AFTER": _lua_string(str(retry_after_seconds(limit))),
    }
    code = "".join(f"local {name} = {value}\n" for name, value in settings.items())
    lua = Lua(default_source_code=DataSource(inline_string=code + UNAUTHENTICATED_LUA.read_text(encoding="utf-8")))
    return HttpFilter(name=GUARD_FILTER, typed_config=_any(lua))


def auth_filters(registry: Registry) -> list[HttpFilter]:
    """Authenticate, authorize, rate-limit: all in Envoy, before ext_proc; none without consumers."""
    if not registry.consumers:
        return []
    filters = [unauthenticated_guard(registry.limits.unauthenticated)]
    if any(c.jwt is not None for c in registry.consumers):
        filters.append(jwt_filter(registry))
    lua = Lua(default_source_code=DataSource(inline_string=authentication_lua(registry)))
    filters.append(HttpFilter(name=LUA_FILTER, typed_config=_any(lua)))
    filters.append(HttpFilter(name=AUTHZ_FILTER, typed_config=_any(Rbac())))
    limited = [c for c in registry.consumers if c.rate_limit is not None]
    if limited:
        filters.append(rate_limit_filter(limited))
    return filters
