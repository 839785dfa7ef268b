"""Errors as values: one `BrokerError` shape, each code with its HTTP status.

    BrokerError(code, message)        -- what the client sees as JSON
    └── raised only at the I/O edges as FeatureStoreUnavailable, translated
        from redis/OS errors in `adapters/` and nowhere else

The client always gets ``{"error": {"code", "message", "request_id"}}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ErrorCode(StrEnum):
    """Stable error codes; clients switch on these, so never rename one."""

    INVALID_JSON = "invalid_json"
    INVALID_BODY = "invalid_body"
    MISSING_ENTITY_KEY = "missing_entity_key"
    INVALID_ENTITY_KEY = "invalid_entity_key"
    BODY_TOO_LARGE = "body_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    UNKNOWN_ROUTE = "unknown_route"
    UNKNOWN_MODEL = "unknown_model"
    UNKNOWN_ENTITY = "unknown_entity"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    FEATURE_STORE_UNAVAILABLE = "feature_store_unavailable"
    BROKER_UNAVAILABLE = "broker_unavailable"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    # Ensembles: a member that answered with an error status or no JSON, a member cut
    # off by the ensemble's deadline, too few members answering, a combiner that could not combine.
    UPSTREAM_ERROR = "upstream_error"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    ENSEMBLE_FAILED = "ensemble_failed"
    ENSEMBLE_TIMEOUT = "ensemble_timeout"
    AGGREGATION_FAILED = "aggregation_failed"
    AUDIT_UNAVAILABLE = "audit_unavailable"
    # Open Inference Protocol routes: a malformed input tensor, more rows than the model allows,
    # a version the model does not have, a stored feature its tensor's datatype cannot hold,
    # a model (version) whose backends do not answer ready.
    INVALID_TENSOR = "invalid_tensor"
    TOO_MANY_ROWS = "too_many_rows"
    UNKNOWN_VERSION = "unknown_version"
    INVALID_FEATURE = "invalid_feature"
    MODEL_NOT_READY = "model_not_ready"
    # A feature the model needs could not be had (absent from the store, stale past its view's
    # TTL, a derived one whose expression failed) and the model's `missing_features` policy is `reject`.
    MISSING_FEATURES = "missing_features"
    # Shedding load (Envoy's overload manager or circuit breaker, a worker at `broker.max_in_flight`).
    OVERLOADED = "overloaded"
    # Control-plane admin API (weights, rollouts), not the request path.
    INVALID_WEIGHTS = "invalid_weights"
    ADMIN_UNAUTHORIZED = "admin_unauthorized"
    # Ground truth (`POST /v1/feedback`): a malformed item, a request id the audit trail does not hold,
    # one whose model takes no feedback (not audited, no `feedback` declared) or whose answer cannot be
    # scored, a second truth that contradicts the first, a model the consumer may not call.
    INVALID_FEEDBACK = "invalid_feedback"
    UNKNOWN_REQUEST = "unknown_request"
    NOT_AUDITED = "not_audited"
    NOT_SCORABLE = "not_scorable"
    FEEDBACK_CONFLICT = "feedback_conflict"
    FORBIDDEN = "forbidden"


STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_JSON: 400,
    ErrorCode.INVALID_BODY: 400,
    ErrorCode.MISSING_ENTITY_KEY: 400,
    ErrorCode.INVALID_ENTITY_KEY: 400,
    ErrorCode.BODY_TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.UNKNOWN_ROUTE: 404,
    ErrorCode.UNKNOWN_MODEL: 404,
    ErrorCode.UNKNOWN_ENTITY: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.FEATURE_STORE_UNAVAILABLE: 503,
    ErrorCode.BROKER_UNAVAILABLE: 503,
    ErrorCode.UPSTREAM_UNAVAILABLE: 503,
    ErrorCode.UPSTREAM_TIMEOUT: 504,
    ErrorCode.UPSTREAM_ERROR: 502,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.ENSEMBLE_FAILED: 502,
    ErrorCode.ENSEMBLE_TIMEOUT: 504,
    ErrorCode.AGGREGATION_FAILED: 502,
    ErrorCode.AUDIT_UNAVAILABLE: 503,
    ErrorCode.INVALID_TENSOR: 400,
    ErrorCode.TOO_MANY_ROWS: 413,
    ErrorCode.UNKNOWN_VERSION: 404,
    # The store holds a value the model's tensor cannot carry: the data is wrong, not the request.
    ErrorCode.INVALID_FEATURE: 502,
    # OIP's readiness answer is a 4xx status (inference_rest.md, "Model Ready").
    ErrorCode.MODEL_NOT_READY: 400,
    # The request is well formed, but what the model needs cannot be computed from it.
    ErrorCode.MISSING_FEATURES: 422,
    ErrorCode.OVERLOADED: 503,
    ErrorCode.INVALID_WEIGHTS: 400,
    ErrorCode.ADMIN_UNAUTHORIZED: 401,
    ErrorCode.INVALID_FEEDBACK: 400,
    ErrorCode.UNKNOWN_REQUEST: 404,
    ErrorCode.NOT_AUDITED: 409,
    ErrorCode.NOT_SCORABLE: 409,
    ErrorCode.FEEDBACK_CONFLICT: 409,
    ErrorCode.FORBIDDEN: 403,
}


@dataclass(frozen=True, slots=True)
class BrokerError:
    """A failure the client must hear about, returned (not raised) by pure code."""

    code: ErrorCode
    message: str

    @property
    def status(self) -> int:
        return STATUS[self.code]

    def to_json(self, request_id: str) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code.value, "message": self.message, "request_id": request_id}}


class FeatureStoreUnavailable(Exception):
    """The feature store did not answer in time or refused; raised by adapters only."""
