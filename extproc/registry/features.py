"""The feature store section and entities: where features come from and how their keys are built."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from extproc.registry.common import Strict
from extproc.registry.patterns import DNS_LABEL, JSON_KEY, REDIS_URL


class RedisStore(Strict):
    url: Annotated[str, Field(pattern=REDIS_URL)]


class EmbeddedStore(Strict):
    """Features from a local JSON file: ``{"<store key>": {"<feature>": value}}``."""

    path: str


class FeatureCache(Strict):
    ttl_seconds: Annotated[float, Field(ge=0, le=86_400)] = 5.0
    max_entries: Annotated[int, Field(ge=1, le=10_000_000)] = 100_000


class FeatureStore(Strict):
    redis: RedisStore | None = None
    embedded: EmbeddedStore | None = None
    timeout_ms: Annotated[int, Field(ge=1, le=60_000)] = 50
    cache: FeatureCache = FeatureCache()

    @model_validator(mode="after")
    def _one_source(self) -> FeatureStore:
        if (self.redis is None) == (self.embedded is None):
            raise ValueError("declare exactly one of 'redis' or 'embedded'")
        return self


class Entity(Strict):
    """Feast-style entity: which body field holds the key and how the store is keyed."""

    name: Annotated[str, Field(pattern=DNS_LABEL)]
    join_key: Annotated[str, Field(pattern=JSON_KEY)]
    # Redis hash key; `{<join_key>}` is replaced by the entity's key.
    store_key: str | None = None

    @model_validator(mode="after")
    def _template(self) -> Entity:
        if self.store_key is not None and self.store_key.count("{" + self.join_key + "}") != 1:
            raise ValueError(f"store_key must contain '{{{self.join_key}}}' exactly once")
        return self

    @property
    def key_template(self) -> str:
        return self.store_key or f"{self.name}:{{{self.join_key}}}"
