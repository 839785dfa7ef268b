"""Models, their versions and backends, sticky routing, rollout policy and shadows."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import ConfigDict, Field, field_validator, model_validator

from extproc import wire
from extproc.registry.common import FeatureName, Port, Strict
from extproc.registry.logic import Derived, MissingPolicy, Rule
from extproc.registry.model_registry import BackendTemplate, ModelRegistrySource
from extproc.registry.open_inference import OpenInference, infer_path
from extproc.registry.patterns import (
    ABSOLUTE_PATH,
    AWS_REGION,
    DNS_LABEL,
    HEADER_NAME,
    JSON_KEY,
    ROUTE_PATH,
    SAGEMAKER_NAME,
)


class ServiceBackend(Strict):
    """A Kubernetes-style service: `host:port` plus the path the model serves on."""

    host: str
    port: Port
    path: Annotated[str, Field(pattern=ABSOLUTE_PATH)] = "/predict"


# Where Envoy's SigV4 signer may take credentials from. Only what is listed is tried, so the
# instance-metadata probe (a network call, and a surprise off EC2) runs only when declared.
CredentialSource = Literal["environment", "credentials_file", "container", "instance_metadata"]
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


class SageMakerBackend(Strict):
    endpoint: Annotated[str, Field(pattern=SAGEMAKER_NAME)]
    region: Annotated[str, Field(pattern=AWS_REGION)]
    target_variant: Annotated[str, Field(pattern=SAGEMAKER_NAME)] | None = None
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
    header: Annotated[str, Field(pattern=HEADER_NAME)] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Sticky:
        if (self.body_field is None) == (self.header is None):
            raise ValueError("declare exactly one of 'body_field' or 'header'")
        # Envoy strips every client `x-broker-*` header: a sticky key there would never arrive.
        if self.header is not None and self.header.startswith(("x-envoy-", wire.BROKER_HEADER_PREFIX)):
            raise ValueError(f"'{self.header}' is reserved")
        return self


class AccuracyGate(Strict):
    """Promotion on ground truth: the canary's fed-back accuracy (or MAE) must not be worse than the
    champion's by more than `margin`, shown at `confidence`; until both have `min_labelled` labels
    and the test is conclusive, the canary waits at its step. Shown worse: rolled back."""

    min_labelled: Annotated[int, Field(ge=10, le=10_000_000)] = 100
    # The drop tolerated: accuracy (0.02 = two points) or MAE (in the answer's unit). At 0 the canary
    # must be shown better than the champion; equal ones pass only with a margin above the noise.
    margin: Annotated[float, Field(ge=0, le=1_000_000)] = 0.02
    # One-sided: Newcombe's hybrid score interval (classification), Welch's z (regression).
    confidence: Annotated[float, Field(ge=0.5, le=0.999)] = 0.95


class RolloutPolicy(Strict):
    """Automatic rollback: the canary's weight goes to 0 on every Envoy when it misbehaves.

    Judged by the control plane from Envoy's per-cluster stats over a sliding window;
    nothing is decided before `min_requests` reached the canary within the window.
    """

    # Required, except on a model that follows a model registry: there the challenger is the canary.
    canary: Annotated[str, Field(pattern=DNS_LABEL)] | None = None
    window_seconds: Annotated[float, Field(ge=2, le=3600)] = 60.0
    min_requests: Annotated[int, Field(ge=1, le=1_000_000)] = 20
    # 5xx responses (from the canary, or Envoy's for it: resets, timeouts) over requests.
    max_error_rate: Annotated[float, Field(ge=0, le=1)] = 0.05
    max_p95_ms: Annotated[int, Field(ge=1, le=600_000)] | None = None
    # Staged promotion: the canary's traffic percent steps up (e.g. 5, 25, 50, 100) each
    # time it stayed healthy, with at least `min_requests` judged, for `promote_after_seconds`.
    promote_steps: tuple[Annotated[int, Field(ge=1, le=100)], ...] = ()
    promote_after_seconds: Annotated[float, Field(ge=1, le=86_400)] = 300.0
    # Ground truth must show the canary no worse than the champion before each promotion (needs `feedback`).
    accuracy: AccuracyGate | None = None

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


class Feedback(Strict):
    """Ground truth for this model's answers (`POST /v1/feedback`), joined to the audit record by request id."""

    # classification: the answer's field equals the truth (accuracy); regression: |answer - truth| (MAE).
    kind: Literal["classification", "regression"]
    # The top-level field of the answer compared with the truth.
    answer_field: Annotated[str, Field(pattern=JSON_KEY)]


class Batch(Strict):
    """Batch requests: a body field holding N rows, each with its entity key and its own features."""

    field: Annotated[str, Field(pattern=JSON_KEY)]
    # More rows than this: 413 too_many_rows. All rows are fetched in one store round trip.
    max_rows: Annotated[int, Field(ge=1, le=10_000)] = 100


class Model(Strict):
    name: Annotated[str, Field(pattern=DNS_LABEL)]
    # Required for `json` models (checked with the other models); an `open_inference` model is
    # served at its V2 paths, `/v2/models/<name>/infer` and the rest.
    path: Annotated[
        str,
        # No default in the JSON schema (the CRDs): Kubernetes checks a default against the pattern.
        Field(pattern=ROUTE_PATH, json_schema_extra=lambda schema: schema.pop("default")),
    ] = ""
    # json: features under `inject_as` in a JSON body. open_inference: KServe V2 / Open Inference
    # Protocol requests, features as input tensors (`open_inference` says how).
    protocol: Literal["json", "open_inference"] = "json"
    open_inference: OpenInference | None = None
    entity: str
    features: tuple[FeatureName, ...] = ()
    # Where injected features go in the body; a consumer's copy is overwritten.
    inject_as: Annotated[str, Field(pattern=JSON_KEY)] = "features"
    # fail_closed: feature store trouble → 503. fail_open: forward without features.
    failure_policy: Literal["fail_closed", "fail_open"] = "fail_closed"
    # reject: unknown entity → 404 unknown_entity. forward: send with empty features.
    unknown_entity: Literal["reject", "forward"] = "reject"
    # A Feast feature service whose features this model needs too (feature_store.feast only).
    feature_service: str | None = None
    batch: Batch | None = None
    timeout_ms: Annotated[int, Field(ge=1, le=600_000)] = 15_000
    # None follows `audit.enabled`; true/false overrides it for this model.
    audit: bool | None = None
    sticky: Sticky | None = None
    rollout: RolloutPolicy | None = None
    shadow: Shadow | None = None
    feedback: Feedback | None = None
    # On-demand features computed per request (CEL), injected beside the stored ones.
    derived: tuple[Derived, ...] = ()
    # Segment rules (CEL), in order: the first that holds pins the version; none → the weighted split.
    rules: tuple[Rule, ...] = ()
    # A feature the model needs and cannot have (absent from the store, stale past its view's TTL, a derived
    # one that failed): reject → 422 missing_features; forward_degraded → without it; null → as null.
    missing_features: MissingPolicy = "reject"
    # Versions from a model registry (MLflow aliases) instead of `versions`; each gets `backend_template`.
    registry: ModelRegistrySource | None = None
    backend_template: BackendTemplate | None = None
    versions: tuple[Version, ...] = ()

    @model_validator(mode="after")
    def _versions_source(self) -> Model:
        if self.registry is None:
            if self.backend_template is not None:
                raise ValueError("backend_template is only for a model with a `registry`")
            if self.rollout is not None and self.rollout.canary is None:
                raise ValueError("rollout.canary: name the version to judge")
            return self
        if self.backend_template is None:
            raise ValueError("a model with a `registry` needs a backend_template for its versions")
        if self.shadow is not None:
            raise ValueError("a model with a `registry` has no fixed version to shadow")
        steps = self.rollout.promote_steps if self.rollout is not None else ()
        if not steps or steps[-1] != 100:
            raise ValueError("a model with a `registry` needs rollout.promote_steps ending at 100")
        return self

    @model_validator(mode="before")
    @classmethod
    def _v2_path(cls, data: Any) -> Any:
        """An OIP model's path is its V2 infer path, filled in so routes and members find it."""
        if isinstance(data, dict) and data.get("protocol") == "open_inference" and "path" not in data:
            return {**data, "path": infer_path(str(data.get("name", "")))}
        return data

    @field_validator("missing_features", mode="before")
    @classmethod
    def _quoted_null(cls, value: object) -> object:
        if value is None:  # YAML reads a bare `null` as no value at all
            raise ValueError("write 'null' in quotes (a bare null in YAML means no value)")
        return value

    @property
    def live_versions(self) -> tuple[Version, ...]:
        return tuple(v for v in self.versions if v.weight > 0)

    @property
    def rule_versions(self) -> tuple[str, ...]:
        """Versions a rule can pin, in declared order (each gets a route of its own in Envoy)."""
        named = {version for rule in self.rules for version, _ in rule.targets()}
        return tuple(v.name for v in self.versions if v.name in named)

    @property
    def required_features(self) -> tuple[str, ...]:
        """Union over the versions that can get traffic (live, the shadow, any a rule names), so
        whichever version gets a request has its features."""
        names = dict.fromkeys(self.features)
        reachable = set(self.rule_versions)
        if self.shadow is not None:  # the shadow gets the same enriched request
            reachable.add(self.shadow.version)
        for version in self.versions:
            if version.weight > 0 or version.name in reachable:
                names.update(dict.fromkeys(version.features))
        return tuple(names)
