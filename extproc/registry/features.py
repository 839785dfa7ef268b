"""The feature store section and entities: where features come from and how their keys are built."""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from extproc.registry.common import FeatureName, Strict
from extproc.registry.patterns import DNS_LABEL, FEAST_NAME, FEAST_PROJECT, JSON_KEY, REDIS_URL


class RedisStore(Strict):
    url: Annotated[str, Field(pattern=REDIS_URL)]
    # Feast's own word (`online_store.redis_type` in feature_store.yaml): one Redis, or a
    # Redis Cluster whose other nodes are discovered from the one in `url`.
    redis_type: Literal["redis", "redis_cluster"] = "redis"

    @property
    def cluster(self) -> bool:
        return self.redis_type == "redis_cluster"

    @model_validator(mode="after")
    def _cluster_url(self) -> RedisStore:
        if not self.cluster:
            return self
        parsed = urlsplit(self.url)
        if parsed.scheme == "unix":
            raise ValueError("a Redis Cluster is reached over TCP: use a redis:// or rediss:// URL of one of its nodes")
        if parsed.path.strip("/") not in ("", "0"):
            raise ValueError(
                f"a Redis Cluster has only database 0, the URL selects {parsed.path.strip('/')!r}: "
                "drop the path (redis://host:6379)"
            )
        return self


class EmbeddedStore(Strict):
    """Features from a local JSON file: ``{"<store key>": {"<feature>": value}}``."""

    path: str


class FeatureCache(Strict):
    ttl_seconds: Annotated[float, Field(ge=0, le=86_400)] = 5.0
    max_entries: Annotated[int, Field(ge=1, le=10_000_000)] = 100_000


class FeastView(Strict):
    """A Feast feature view: which entities key it, and its max age."""

    name: Annotated[str, Field(pattern=FEAST_NAME)]
    # Names of `entities[]`: their join keys, sorted as Feast sorts them, make the Redis key.
    entities: Annotated[tuple[str, ...], Field(min_length=1)]
    # Feast's `ttl`: values older than this (from the view's `_ts`) count as stale; 0 = no max age.
    ttl_seconds: Annotated[float, Field(ge=0, le=10 * 365 * 86_400)] = 0


class FeastService(Strict):
    """A Feast feature service: a named list of references a model can ask for at once."""

    name: Annotated[str, Field(pattern=FEAST_NAME)]
    features: Annotated[tuple[FeatureName, ...], Field(min_length=1)]


class FeastStore(Strict):
    redis: RedisStore
    project: Annotated[str, Field(pattern=FEAST_PROJECT)]
    entity_key_serialization_version: int = 3
    # Inject `view__feature` (Feast's full feature names) instead of `feature`.
    full_feature_names: bool = False
    feature_views: Annotated[tuple[FeastView, ...], Field(min_length=1)]
    feature_services: tuple[FeastService, ...] = ()

    @field_validator("entity_key_serialization_version")
    @classmethod
    def _version_3(cls, version: int) -> int:
        if version != 3:
            raise ValueError(
                f"version {version} is not supported: Feast writes version 3 (its default since 0.38; "
                "earlier ones are deprecated); re-serialize the online store with Feast's guide"
            )
        return version

    def view(self, name: str) -> FeastView | None:
        return next((v for v in self.feature_views if v.name == name), None)

    def service(self, name: str) -> FeastService | None:
        return next((s for s in self.feature_services if s.name == name), None)


class FeatureStore(Strict):
    redis: RedisStore | None = None
    embedded: EmbeddedStore | None = None
    # Feast's Redis online store, read natively (Feast's keys, fields and values).
    feast: FeastStore | None = None
    timeout_ms: Annotated[int, Field(ge=1, le=60_000)] = 50
    cache: FeatureCache = FeatureCache()

    @model_validator(mode="after")
    def _one_source(self) -> FeatureStore:
        if sum(source is not None for source in (self.redis, self.embedded, self.feast)) != 1:
            raise ValueError("declare exactly one of 'redis', 'embedded' or 'feast'")
        return self


class Entity(Strict):
    """Feast-style entity: which body field holds the key and how the store is keyed."""

    name: Annotated[str, Field(pattern=DNS_LABEL)]
    join_key: Annotated[str, Field(pattern=JSON_KEY)]
    # Feast's value type of the join key (how Feast serializes it); the own layout ignores it.
    value_type: Literal["string", "int64", "int32"] = "string"
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
