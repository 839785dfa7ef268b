"""Who may call: API keys, JWT issuers, per-consumer rate limits and allow-lists."""

from __future__ import annotations

import hashlib
from typing import Annotated, Literal

from pydantic import Field, model_validator

from extproc.registry.common import ALL_ROUTES, Strict
from extproc.registry.patterns import API_KEY_HASH, DNS_LABEL, JWKS_URL


def hash_api_key(key: str) -> str:
    """The registry form of an API key: what `consumers[].api_keys` holds instead of the key."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


class RateLimit(Strict):
    """A token bucket: `requests` tokens per `unit`, holding at most `burst` (default `requests`)."""

    requests: Annotated[int, Field(ge=1, le=1_000_000_000)]
    unit: Literal["second", "minute", "hour"] = "second"
    burst: Annotated[int, Field(ge=1, le=1_000_000_000)] | None = None

    @property
    def seconds(self) -> int:
        return {"second": 1, "minute": 60, "hour": 3600}[self.unit]


class JwtCredential(Strict):
    """Tokens from `issuer` (optionally only for `subject`) verified against a JWKS file or URL."""

    issuer: Annotated[str, Field(min_length=1)]
    audiences: tuple[Annotated[str, Field(min_length=1)], ...] = ()
    subject: Annotated[str, Field(min_length=1)] | None = None
    jwks_file: str | None = None
    jwks_uri: Annotated[str, Field(pattern=JWKS_URL)] | None = None
    # Tokens must carry `exp`, at most this far after `iat` (or `nbf`): a leaked token does not live forever.
    max_lifetime_seconds: Annotated[int, Field(ge=60, le=31_536_000)] = 86_400

    @model_validator(mode="after")
    def _one_source(self) -> JwtCredential:
        if (self.jwks_file is None) == (self.jwks_uri is None):
            raise ValueError("declare exactly one of 'jwks_file' or 'jwks_uri'")
        return self


class Consumer(Strict):
    """Who may call: credentials, the routes it may call, and its rate limit."""

    name: Annotated[str, Field(pattern=DNS_LABEL)]
    # SHA-256 of each API key (`model-broker hash-key`); several allow rotation without downtime.
    api_keys: tuple[Annotated[str, Field(pattern=API_KEY_HASH)], ...] = ()
    jwt: JwtCredential | None = None
    # Models and ensembles it may call, by name, or "*" for all of them.
    models: tuple[str, ...] = ()
    # May call the admin endpoints (GET /models) when they are on the public listener.
    admin: bool = False
    rate_limit: RateLimit | None = None

    @model_validator(mode="after")
    def _has_credential(self) -> Consumer:
        if not self.api_keys and self.jwt is None:
            raise ValueError("declare 'api_keys', 'jwt' or both")
        return self

    def may_call(self, route: str) -> bool:
        return route in self.models or ALL_ROUTES in self.models
