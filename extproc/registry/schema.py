"""The registry: one declarative YAML file of models, versions, features and limits.

Validated at load; every problem is reported with its field path so
`model-broker check` can list them all at once.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from extproc.core import wire

# A model or version name becomes part of Envoy cluster and stat names and,
# later, a Kubernetes object name: keep it a DNS label.
DNS_LABEL = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
FEATURE_NAME = r"^[A-Za-z_][A-Za-z0-9_.:-]{0,127}$"
# What `model-broker hash-key` prints: the algorithm is named so it can change later.
API_KEY_HASH = r"^sha256:[0-9a-f]{64}$"
# In a consumer's allow-list: every model and every ensemble.
ALL_ROUTES = "*"
JSON_KEY = r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$"

Port = Annotated[int, Field(ge=1, le=65535)]
FeatureName = Annotated[str, Field(pattern=FEATURE_NAME)]


class Strict(BaseModel):
    """Unknown keys are errors: a typo in a registry must not pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Address(Strict):
    address: str = "127.0.0.1"
    port: Port


class TLS(Strict):
    """PEM files for the public listener; relative paths resolve next to the registry."""

    certificate_chain: str
    private_key: str


class Listener(Address):
    # Declared certificate files switch the public listener to HTTPS only.
    tls: TLS | None = None


class Admin(Address):
    # Serve the broker's admin endpoints (GET /models) on the public listener.
    # Default: yes in open mode (no consumers), no once consumers are declared.
    public_endpoints: bool | None = None


class Broker(Strict):
    """Where the ext_proc workers listen: one port per worker, `port`, `port+1`, …"""

    address: str = "127.0.0.1"
    port: Port = 50051
    workers: Annotated[int, Field(ge=1, le=64)] = 2
    # Envoy's per-message deadline for the broker; must cover the feature store budget.
    message_timeout_ms: Annotated[int, Field(ge=10, le=60_000)] = 500


class Metrics(Strict):
    """Where the supervisor serves Prometheus metrics for all workers (`/metrics`)."""

    address: str = "127.0.0.1"
    port: Port = 9464


class ControlPlane(Strict):
    """The rollout control plane: live weights for every Envoy (RTDS) and the admin API.

    `state_file` holds the live weights so they survive broker and Envoy restarts;
    a relative path resolves next to the registry.
    """

    address: str = "127.0.0.1"
    # gRPC: the runtime discovery service every Envoy subscribes to.
    port: Port = 18000
    # HTTP admin API (`weights set`), bearer-token authenticated.
    admin_port: Port = 9466
    state_file: str = "rollout-state.json"


class RedisStore(Strict):
    url: Annotated[str, Field(pattern=r"^(redis|rediss|unix)://")]


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


class ServiceBackend(Strict):
    """A Kubernetes-style service: `host:port` plus the path the model serves on."""

    host: str
    port: Port
    path: Annotated[str, Field(pattern=r"^/")] = "/predict"


# Where Envoy's SigV4 signer may take credentials from. Only what is listed is tried, so the
# instance-metadata probe (a network call, and a surprise off EC2) runs only when declared.
CredentialSource = Literal["environment", "credentials_file", "container", "instance_metadata"]
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


class SageMakerBackend(Strict):
    endpoint: Annotated[str, Field(pattern=r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")]
    region: Annotated[str, Field(pattern=r"^[a-z]{2}(-[a-z]+)+-\d$")]
    target_variant: Annotated[str, Field(pattern=r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")] | None = None
    # Another SageMaker runtime endpoint (a VPC endpoint, or moto in tests): https, or http on loopback only.
    endpoint_url: str | None = None
    credentials: tuple[CredentialSource, ...] = ("environment", "credentials_file")

    @model_validator(mode="after")
    def _endpoint_url(self) -> SageMakerBackend:
        if self.endpoint_url is None:
            return self
        url = urlsplit(self.endpoint_url)
        if url.scheme not in ("http", "https") or not url.hostname or url.path not in ("", "/") or url.query:
            raise ValueError("endpoint_url must be scheme://host[:port] with scheme http or https")
        if url.scheme == "http" and url.hostname not in LOOPBACK_HOSTS:
            raise ValueError("endpoint_url may use plain http only on loopback (tests); use https")
        return self

    @property
    def host(self) -> str:
        if self.endpoint_url is None:
            return f"runtime.sagemaker.{self.region}.amazonaws.com"
        return str(urlsplit(self.endpoint_url).hostname)

    @property
    def port(self) -> int:
        url = urlsplit(self.endpoint_url or "https://runtime")
        return url.port or (443 if url.scheme == "https" else 80)

    @property
    def tls(self) -> bool:
        return self.endpoint_url is None or self.endpoint_url.startswith("https:")

    @property
    def authority(self) -> str:
        """The Host header the request is signed with and sent under."""
        default = 443 if self.tls else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"

    @property
    def path(self) -> str:
        return f"/endpoints/{self.endpoint}/invocations"


class Backend(Strict):
    # "Exactly one kind" in the JSON schema too, so the generated CRD rejects both or neither at `kubectl apply`.
    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["service"]}, {"required": ["sagemaker"]}]})

    service: ServiceBackend | None = None
    sagemaker: SageMakerBackend | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Backend:
        if (self.service is None) == (self.sagemaker is None):
            raise ValueError("declare exactly one of 'service' or 'sagemaker'")
        return self


class Version(Strict):
    name: Annotated[str, Field(pattern=DNS_LABEL)]
    # Gateway API `backendRefs[].weight` semantics: relative, 0 takes no traffic.
    weight: Annotated[int, Field(ge=0, le=1_000_000)]
    backend: Backend
    # Features this version needs beyond the model's own.
    features: tuple[FeatureName, ...] = ()


class Sticky(Strict):
    """Sticky A/B: the same key always lands on the same version while the weights stay.

    `body_field`: the broker copies that field into the header Envoy hashes (a client's
    copy of the header is overwritten). `header`: Envoy hashes the client's header itself.
    """

    body_field: Annotated[str, Field(pattern=JSON_KEY)] | None = None
    header: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Sticky:
        if (self.body_field is None) == (self.header is None):
            raise ValueError("declare exactly one of 'body_field' or 'header'")
        if self.header is not None and (self.header.startswith("x-envoy-") or self.header == wire.HEADER_STICKY_KEY):
            raise ValueError(f"'{self.header}' is reserved")
        return self


class RolloutPolicy(Strict):
    """Automatic rollback: the canary's weight goes to 0 on every Envoy when it misbehaves.

    Judged by the control plane from Envoy's per-cluster stats over a sliding window;
    nothing is decided before `min_requests` reached the canary within the window.
    """

    canary: Annotated[str, Field(pattern=DNS_LABEL)]
    window_seconds: Annotated[float, Field(ge=2, le=3600)] = 60.0
    min_requests: Annotated[int, Field(ge=1, le=1_000_000)] = 20
    # 5xx responses (from the canary, or Envoy's for it: resets, timeouts) over requests.
    max_error_rate: Annotated[float, Field(ge=0, le=1)] = 0.05
    max_p95_ms: Annotated[int, Field(ge=1, le=600_000)] | None = None
    # Staged promotion: the canary's traffic percent steps up (e.g. 5, 25, 50, 100) each
    # time it stayed healthy, with at least `min_requests` judged, for `promote_after_seconds`.
    promote_steps: tuple[Annotated[int, Field(ge=1, le=100)], ...] = ()
    promote_after_seconds: Annotated[float, Field(ge=1, le=86_400)] = 300.0

    @model_validator(mode="after")
    def _steps_rise(self) -> RolloutPolicy:
        if list(self.promote_steps) != sorted(set(self.promote_steps)):
            raise ValueError("promote_steps must strictly increase")
        return self


class Shadow(Strict):
    """A version that gets a mirrored copy of every enriched request; its answer reaches nobody
    but the broker, which records it beside the primary's and compares `compare_field`."""

    version: Annotated[str, Field(pattern=DNS_LABEL)]
    # A top-level field of both answers: exact-match rate, and mean absolute difference if numeric.
    compare_field: Annotated[str, Field(pattern=JSON_KEY)]


class Model(Strict):
    name: Annotated[str, Field(pattern=DNS_LABEL)]
    path: Annotated[str, Field(pattern=r"^/[A-Za-z0-9._~!$&'()*+,;=:@/-]*$")]
    entity: str
    features: tuple[FeatureName, ...] = ()
    # Where injected features go in the body; a consumer's copy is overwritten.
    inject_as: Annotated[str, Field(pattern=JSON_KEY)] = "features"
    # fail_closed: feature store trouble → 503. fail_open: forward without features.
    failure_policy: Literal["fail_closed", "fail_open"] = "fail_closed"
    # reject: unknown entity → 404 unknown_entity. forward: send with empty features.
    unknown_entity: Literal["reject", "forward"] = "reject"
    timeout_ms: Annotated[int, Field(ge=1, le=600_000)] = 15_000
    # None follows `audit.enabled`; true/false overrides it for this model.
    audit: bool | None = None
    sticky: Sticky | None = None
    rollout: RolloutPolicy | None = None
    shadow: Shadow | None = None
    versions: tuple[Version, ...]

    @property
    def live_versions(self) -> tuple[Version, ...]:
        return tuple(v for v in self.versions if v.weight > 0)

    @property
    def required_features(self) -> tuple[str, ...]:
        """Union over the live versions and the shadow, so whichever version gets it has its features."""
        names = dict.fromkeys(self.features)
        shadow = self.shadow.version if self.shadow is not None else None
        for version in self.versions:
            if version.weight > 0 or version.name == shadow:  # the shadow gets the same enriched request
                names.update(dict.fromkeys(version.features))
        return tuple(names)


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
    jwks_uri: Annotated[str, Field(pattern=r"^https?://[^/:]+(:\d+)?(/.*)?$")] | None = None

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


AggregationMethod = Literal["all", "mean", "weighted_mean", "majority_vote", "first_success"]
# Methods that read one field of every member's answer.
FIELD_METHODS = frozenset({"mean", "weighted_mean", "majority_vote"})


class Aggregation(Strict):
    """How members' answers become one: `all` returns each result and combines nothing."""

    method: AggregationMethod = "all"
    # The answer field combined: numeric for (weighted_)mean, a label for majority_vote;
    # optional for first_success (the whole answer when absent).
    field: Annotated[str, Field(pattern=JSON_KEY)] | None = None

    @model_validator(mode="after")
    def _field_declared(self) -> Aggregation:
        if self.method in FIELD_METHODS and self.field is None:
            raise ValueError(f"'field' is required for {self.method} (the answer field to combine)")
        if self.method == "all" and self.field is not None:
            raise ValueError("'field' has no meaning for 'all'; choose a combining method")
        return self


class EnsembleMember(Strict):
    model: str
    # The broker cancels this member's call after this long.
    timeout_ms: Annotated[int, Field(ge=1, le=600_000)] = 1_000
    # Relative weight in weighted_mean.
    weight: Annotated[float, Field(gt=0, le=1_000_000)] = 1.0


class Ensemble(Strict):
    """One request, several models called concurrently through Envoy, one aggregated answer."""

    name: Annotated[str, Field(pattern=DNS_LABEL)]
    path: Annotated[str, Field(pattern=r"^/[A-Za-z0-9._~!$&'()*+,;=:@/-]*$")]
    members: Annotated[tuple[EnsembleMember, ...], Field(min_length=1)]
    # Overall budget from the body's arrival to the answer, feature fetch included.
    deadline_ms: Annotated[int, Field(ge=1, le=600_000)] = 2_000
    # Members that must succeed for a 200; default: all of them.
    min_success: Annotated[int, Field(ge=1)] | None = None
    aggregation: Aggregation = Aggregation()

    @property
    def required_successes(self) -> int:
        return self.min_success if self.min_success is not None else len(self.members)


class Spool(Strict):
    """The local append-only spool every audit record reaches before its response is released."""

    dir: str
    # The whole spool; each worker owns an equal share (its own subdirectory).
    max_bytes: Annotated[int, Field(ge=4096, le=1 << 40)] = 1 << 30
    segment_bytes: Annotated[int, Field(ge=1024, le=1 << 30)] = 4 << 20
    # A non-empty segment is sealed (and so becomes shippable) after this long.
    seal_after_ms: Annotated[int, Field(ge=10, le=3_600_000)] = 2000
    fsync_interval_ms: Annotated[int, Field(ge=10, le=60_000)] = 1000
    # fail_closed: no room for the record → 503 audit_unavailable. drop: answer, count the loss.
    when_full: Literal["fail_closed", "drop"] = "fail_closed"


class LocalAuditSink(Strict):
    """JSONL files in a directory: the embedded default, no AWS needed."""

    dir: str


class AwsAuditSink(Strict):
    """Payloads to S3, metadata to DynamoDB; credentials from the standard AWS chain."""

    bucket: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")]
    prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9!_.*'()/-]{0,200}$")] = "audit"
    table: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{3,255}$")]
    region: Annotated[str, Field(pattern=r"^[a-z]{2}(-[a-z]+)+-\d$")] = "us-east-1"
    # moto, MinIO or LocalStack; None means AWS itself.
    endpoint_url: Annotated[str, Field(pattern=r"^https?://")] | None = None
    # Time budget of one S3/DynamoDB call; a slower call counts as an outage.
    timeout_ms: Annotated[int, Field(ge=100, le=120_000)] = 5000


class AuditSinks(Strict):
    local: LocalAuditSink | None = None
    aws: AwsAuditSink | None = None

    @model_validator(mode="after")
    def _one_sink(self) -> AuditSinks:
        if (self.local is None) == (self.aws is None):
            raise ValueError("declare exactly one of 'local' or 'aws'")
        return self


class Audit(Strict):
    """Audit trail: spool first, then shipped to the sink in the background."""

    # The default for every model; `models[].audit` overrides it.
    enabled: bool = True
    spool: Spool
    sink: AuditSinks
    # Dotted field paths (`ssn`, `customer.email`) removed from input, features and
    # response before anything is written; a path matches at any depth.
    redact: tuple[Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")], ...] = ()
    ship_interval_ms: Annotated[int, Field(ge=10, le=600_000)] = 1000


class Limits(Strict):
    max_body_bytes: Annotated[int, Field(ge=64, le=64 * 1024 * 1024)] = 1024 * 1024
    # Envoy buffers client body + injected features: its limit is the sum.
    feature_headroom_bytes: Annotated[int, Field(ge=0, le=16 * 1024 * 1024)] = 64 * 1024
    max_json_depth: Annotated[int, Field(ge=2, le=512)] = 32


class Registry(Strict):
    registry_version: str = "0"
    listener: Listener = Listener(port=8080)
    admin: Admin = Admin(port=9901)
    broker: Broker = Broker()
    metrics: Metrics = Metrics()
    control_plane: ControlPlane = ControlPlane()
    feature_store: FeatureStore
    entities: tuple[Entity, ...] = ()
    models: tuple[Model, ...] = ()
    ensembles: tuple[Ensemble, ...] = ()
    # Envoy's loopback listener the broker calls ensemble members through; generated only with ensembles.
    egress: Address = Address(port=8081)
    limits: Limits = Limits()
    audit: Audit | None = None
    # None declared: open mode, anyone who reaches the listener may call any model.
    consumers: tuple[Consumer, ...] = ()

    @property
    def admin_endpoints_public(self) -> bool:
        """Whether GET /models is served on the public listener (see `Admin.public_endpoints`)."""
        if self.admin.public_endpoints is None:
            return not self.consumers
        return self.admin.public_endpoints

    def route_names(self) -> tuple[tuple[str, str], ...]:
        """(name in an allow-list, route name Envoy reports) for every model and ensemble."""
        return (
            *((m.name, m.name) for m in self.models),
            *((e.name, wire.ensemble_route(e.name)) for e in self.ensembles),
        )

    def model(self, name: str) -> Model | None:
        return next((m for m in self.models if m.name == name), None)

    def entity(self, name: str) -> Entity | None:
        return next((e for e in self.entities if e.name == name), None)

    def ensemble(self, name: str) -> Ensemble | None:
        return next((e for e in self.ensembles if e.name == name), None)

    def audited(self, model: Model) -> bool:
        """Whether `model`'s executions are audited (its own flag, else `audit.enabled`)."""
        if self.audit is None:
            return False
        return self.audit.enabled if model.audit is None else model.audit


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a registry, at a field path like `models[0].versions[1].weight`."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class RegistryInvalid(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(map(str, problems)))
        self.problems = problems


def _loc(parts: tuple[int | str, ...]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _unique_names(reg: Registry) -> Iterator[Problem]:
    kinds = (
        ("entities", [e.name for e in reg.entities]),
        ("models", [m.name for m in reg.models]),
        ("ensembles", [e.name for e in reg.ensembles]),
        ("consumers", [c.name for c in reg.consumers]),
    )
    for kind, names in kinds:
        seen: set[str] = set()
        for i, name in enumerate(names):
            if name in seen:
                yield Problem(f"{kind}[{i}].name", f"duplicate name '{name}'")
            seen.add(name)


def _model_references(reg: Registry) -> Iterator[Problem]:
    reserved = {wire.PATH_HEALTHZ, wire.PATH_MODELS}
    paths: dict[str, int] = {}
    for i, model in enumerate(reg.models):
        here = f"models[{i}]"
        if reg.entity(model.entity) is None:
            known = ", ".join(e.name for e in reg.entities) or "none declared"
            yield Problem(f"{here}.entity", f"unknown entity '{model.entity}' (known: {known})")
        if model.path in reserved:
            yield Problem(f"{here}.path", f"'{model.path}' is reserved for the broker")
        elif model.path in paths:
            yield Problem(f"{here}.path", f"'{model.path}' is already the path of models[{paths[model.path]}]")
        paths.setdefault(model.path, i)
        if not model.versions:
            yield Problem(f"{here}.versions", "declare at least one version")
        elif not model.live_versions:
            yield Problem(f"{here}.versions", "at least one version needs a weight above 0")
        seen: set[str] = set()
        for j, version in enumerate(model.versions):
            if version.name in seen:
                yield Problem(f"{here}.versions[{j}].name", f"duplicate version '{version.name}'")
            seen.add(version.name)
        if model.shadow is not None and model.shadow.version not in seen:
            yield Problem(f"{here}.shadow.version", f"'{model.shadow.version}' is not a version of {model.name}")
        if model.rollout is not None and model.rollout.canary not in seen:
            yield Problem(f"{here}.rollout.canary", f"'{model.rollout.canary}' is not a version of {model.name}")


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _ensemble_references(reg: Registry) -> Iterator[Problem]:
    taken = {m.path: f"already the path of models[{i}]" for i, m in enumerate(reg.models)}
    taken.update(dict.fromkeys((wire.PATH_HEALTHZ, wire.PATH_MODELS), "reserved for the broker"))
    if reg.ensembles and not _is_loopback(reg.egress.address):
        # Requests on the egress listener skip the broker: nothing off this host may reach it.
        yield Problem("egress.address", f"'{reg.egress.address}' is not a loopback address")
    for i, ensemble in enumerate(reg.ensembles):
        here = f"ensembles[{i}]"
        if ensemble.path in taken:
            yield Problem(f"{here}.path", f"'{ensemble.path}' is {taken[ensemble.path]}")
        taken.setdefault(ensemble.path, f"already the path of {here}")
        if ensemble.required_successes > len(ensemble.members):
            yield Problem(
                f"{here}.min_success",
                f"{ensemble.required_successes} exceeds the {len(ensemble.members)} member(s) declared",
            )
        slowest = max(range(len(ensemble.members)), key=lambda j: ensemble.members[j].timeout_ms)
        if ensemble.members[slowest].timeout_ms > ensemble.deadline_ms:
            yield Problem(
                f"{here}.deadline_ms",
                f"{ensemble.deadline_ms} ms is shorter than members[{slowest}].timeout_ms "
                f"({ensemble.members[slowest].timeout_ms} ms)",
            )
        yield from _members(reg, ensemble, here)


def _members(reg: Registry, ensemble: Ensemble, here: str) -> Iterator[Problem]:
    """Members must be distinct models of one entity: one store round trip for all."""
    seen: set[str] = set()
    entity: tuple[str, int] | None = None
    for j, member in enumerate(ensemble.members):
        at = f"{here}.members[{j}]"
        model = reg.model(member.model)
        if member.model in seen:
            yield Problem(f"{at}.model", f"'{member.model}' is already a member")
        seen.add(member.model)
        if model is None:
            # Only models are members, so ensembles cannot form cycles.
            known = ", ".join(m.name for m in reg.models) or "none declared"
            what = (
                f"'{member.model}' is an ensemble; members must be models"
                if reg.ensemble(member.model)
                else f"unknown model '{member.model}'"
            )
            yield Problem(f"{at}.model", f"{what} (models: {known})")
        elif entity is None:
            entity = (model.entity, j)
        elif model.entity != entity[0]:
            yield Problem(
                f"{at}.model",
                f"entity '{model.entity}' differs from '{entity[0]}' of members[{entity[1]}]; "
                "an ensemble fetches one entity's features in one store call",
            )


def _ports_and_budgets(reg: Registry) -> Iterator[Problem]:
    ports = [("listener.port", reg.listener.port), ("admin.port", reg.admin.port), ("metrics.port", reg.metrics.port)]
    plane = reg.control_plane
    ports += [("control_plane.port", plane.port), ("control_plane.admin_port", plane.admin_port)]
    ports += [(f"broker.port (worker {w})", reg.broker.port + w) for w in range(reg.broker.workers)]
    if reg.ensembles:
        ports.append(("egress.port", reg.egress.port))
    taken: dict[int, str] = {}
    for where, port in ports:
        if port > 65535:
            yield Problem("broker.workers", f"worker ports run past 65535 ({port})")
        elif port in taken:
            yield Problem(where.split(" ")[0], f"port {port} is also {taken[port]}")
        taken.setdefault(port, where)
    if reg.broker.message_timeout_ms <= reg.feature_store.timeout_ms:
        yield Problem(
            "broker.message_timeout_ms",
            f"must exceed feature_store.timeout_ms ({reg.feature_store.timeout_ms}) "
            "or Envoy gives up before the broker can answer 503",
        )


def _consumer_references(reg: Registry) -> Iterator[Problem]:
    """Allow-lists name real routes; a key or a token identifies exactly one consumer."""
    routes = {*(name for name, _ in reg.route_names()), ALL_ROUTES}
    keys: dict[str, str] = {}
    tokens: dict[tuple[str, str | None], str] = {}
    for i, consumer in enumerate(reg.consumers):
        here = f"consumers[{i}]"
        for j, name in enumerate(consumer.models):
            if name not in routes:
                known = ", ".join(n for n, _ in reg.route_names()) or "none declared"
                yield Problem(f"{here}.models[{j}]", f"unknown model or ensemble '{name}' (known: {known}, or '*')")
        for j, key in enumerate(consumer.api_keys):
            if key in keys:
                yield Problem(f"{here}.api_keys[{j}]", f"the same key hash is already {keys[key]}")
            keys.setdefault(key, f"{here}.api_keys[{j}]")
        if consumer.jwt is not None:
            issuer, subject = consumer.jwt.issuer, consumer.jwt.subject
            # A consumer without a subject takes every token of its issuer: sharing it would be ambiguous.
            clash = tokens.get((issuer, subject)) or tokens.get((issuer, None))
            if clash is None and subject is None:
                clash = next((where for (i, _), where in tokens.items() if i == issuer), None)
            if clash is not None:
                yield Problem(f"{here}.jwt", f"a token could match both this consumer and {clash} (same issuer)")
            tokens.setdefault((issuer, subject), here)
    if reg.admin.public_endpoints and reg.consumers and not any(c.admin for c in reg.consumers):
        yield Problem("admin.public_endpoints", "no consumer has 'admin: true', so nobody could call them")


def _audit_references(reg: Registry) -> Iterator[Problem]:
    if reg.audit is None:
        for i, model in enumerate(reg.models):
            if model.audit:
                yield Problem(f"models[{i}].audit", "audit is on but the registry has no 'audit' section")
        return
    share = reg.audit.spool.max_bytes // reg.broker.workers
    if reg.audit.spool.segment_bytes > share:
        yield Problem(
            "audit.spool.segment_bytes",
            f"must not exceed each worker's share of max_bytes ({share} bytes for {reg.broker.workers} workers)",
        )


def _cross_references(reg: Registry) -> Iterator[Problem]:
    """What field validation cannot see: names that must exist, be unique or not collide."""
    yield from _unique_names(reg)
    yield from _model_references(reg)
    yield from _ensemble_references(reg)
    yield from _ports_and_budgets(reg)
    yield from _consumer_references(reg)
    if not _is_loopback(reg.admin.address):
        # Envoy's admin interface has no authentication and can stop Envoy or rewrite its runtime.
        yield Problem("admin.address", f"'{reg.admin.address}' is not loopback; Envoy's admin interface must not be")
    yield from _audit_references(reg)


def parse_registry(data: Any) -> Registry:
    """Validate an already-parsed document; raise `RegistryInvalid` with every problem."""
    if not isinstance(data, dict):
        raise RegistryInvalid([Problem("", "the registry must be a YAML mapping")])
    try:
        reg = Registry.model_validate(data)
    except ValidationError as exc:
        raise RegistryInvalid([Problem(_loc(e["loc"]), e["msg"]) for e in exc.errors()]) from None
    problems = list(_cross_references(reg))
    if problems:
        raise RegistryInvalid(problems)
    return reg


# What a running broker applies from a rewritten registry file; any other section is read at start.
LIVE_SECTIONS = frozenset({"registry_version", "entities", "models", "ensembles"})


def restart_only_changes(old: Registry, new: Registry) -> list[str]:
    """The sections `new` changes that a running broker cannot apply (ports, store, audit, …)."""
    return [
        name for name in Registry.model_fields if name not in LIVE_SECTIONS and getattr(old, name) != getattr(new, name)
    ]


def file_signature(path: str | Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime) of a file, cheap to poll (a ConfigMap's symlink swap changes the inode)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def load_registry(path: str | Path, *, envoy_files: bool = True) -> Registry:
    """Read and validate a registry file; relative store paths resolve next to it.

    `envoy_files=False` skips checking the files only Envoy reads (TLS, JWKS): broker
    and control-plane pods on Kubernetes do not mount them.
    """
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RegistryInvalid([Problem("", f"cannot read {file}: {exc.strerror}")]) from None
    except yaml.YAMLError as exc:
        raise RegistryInvalid([Problem("", f"not valid YAML: {exc}")]) from None
    reg = _resolve_files(parse_registry(data), file)
    problems = list(_file_problems(reg)) if envoy_files else []
    if problems:
        raise RegistryInvalid(problems)
    return reg


def _resolve_files(reg: Registry, file: Path) -> Registry:
    """Every path the registry names, made absolute relative to the registry's directory."""
    embedded = reg.feature_store.embedded
    if embedded is not None:
        store = reg.feature_store.model_copy(update={"embedded": EmbeddedStore(path=_beside(file, embedded.path))})
        reg = reg.model_copy(update={"feature_store": store})
    plane = reg.control_plane
    reg = reg.model_copy(
        update={"control_plane": plane.model_copy(update={"state_file": _beside(file, plane.state_file)})}
    )
    if reg.audit is not None:
        reg = reg.model_copy(update={"audit": _audit_paths_beside(file, reg.audit)})
    tls = reg.listener.tls
    if tls is not None:
        files = TLS(certificate_chain=_beside(file, tls.certificate_chain), private_key=_beside(file, tls.private_key))
        reg = reg.model_copy(update={"listener": reg.listener.model_copy(update={"tls": files})})
    consumers = [
        c.model_copy(update={"jwt": c.jwt.model_copy(update={"jwks_file": _beside(file, c.jwt.jwks_file)})})
        if c.jwt is not None and c.jwt.jwks_file is not None
        else c
        for c in reg.consumers
    ]
    return reg.model_copy(update={"consumers": tuple(consumers)})


def _file_problems(reg: Registry) -> Iterator[Problem]:
    """Files Envoy reads at start: missing or malformed ones are reported now, not as an Envoy crash."""
    tls = reg.listener.tls
    if tls is not None:
        for name in ("certificate_chain", "private_key"):
            if not Path(getattr(tls, name)).is_file():
                yield Problem(f"listener.tls.{name}", f"no such file: {getattr(tls, name)}")
    for i, consumer in enumerate(reg.consumers):
        if consumer.jwt is not None and consumer.jwt.jwks_file is not None:
            problem = _jwks_problem(Path(consumer.jwt.jwks_file))
            if problem:
                yield Problem(f"consumers[{i}].jwt.jwks_file", problem)


def _jwks_problem(path: Path) -> str:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    except ValueError:
        return f"{path} is not JSON"
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list) or not doc["keys"]:
        return f"{path} is not a JWKS (a JSON object with a non-empty 'keys' list)"
    return ""


def _beside(file: Path, path: str) -> str:
    return str((file.parent / path).resolve())


def _audit_paths_beside(file: Path, audit: Audit) -> Audit:
    """The spool and local sink directories, relative paths resolved next to the registry file."""
    spool = audit.spool.model_copy(update={"dir": _beside(file, audit.spool.dir)})
    sink = audit.sink
    if sink.local is not None:
        sink = sink.model_copy(update={"local": LocalAuditSink(dir=_beside(file, sink.local.dir))})
    return audit.model_copy(update={"spool": spool, "sink": sink})
