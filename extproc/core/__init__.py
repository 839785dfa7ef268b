"""The per-request core: what the broker does with one request, in the order it happens.

`context` (per-request state) → `routing` (route name → model plan) → `body` (parse, entity key,
inject) with `features` (store protocol, cache) → `logic` (derived features, segment rules;
`derived`, `rules`, `missing`) → `json_body` (a JSON model route's body phase) → `oip/` (the Open
Inference Protocol) with `oip_body` (its infer request's body phase) → `forward` (both hand the
enriched body on to Envoy) → `ensemble/` (fan-out, aggregation, its body phase) → `responses`
(pure answers); `processor` drives them per ext_proc message (`messages`), behind `admission`
(refusals before any work). No protocol type crosses this boundary: the transports decode and
encode. May import `extproc.wire`, `errors`, `metrics`, the registry and the audit record; never a
transport, Envoy config, Kubernetes, AWS or any network client (a test enforces it).
"""

from extproc.core.admission import AUDIT_FULL
from extproc.core.body import JSONObject, check_content_type, entity_key, inject_features, parse_json_object, sticky_key
from extproc.core.context import RequestContext
from extproc.core.derived import DerivedFeature, derive
from extproc.core.entity import EntityRef, KeyPlan
from extproc.core.feast_codec import FeastValueError
from extproc.core.feast_read import FeastKey, FeastView, ReadPlan
from extproc.core.features import (
    MISSING,
    STALE,
    CachedFeatureStore,
    EmbeddedFeatureStore,
    EntityKey,
    FeatureRow,
    Features,
    FeatureStore,
    decode_value,
    narrow,
    pick,
)
from extproc.core.logic import LogicOutcome, ModelLogic, apply_logic, compile_logic
from extproc.core.messages import HttpBody, HttpHeaders
from extproc.core.missing import DEGRADED_MISSING, settle_missing
from extproc.core.processor import BrokerProcessor, Processor
from extproc.core.responses import (
    CONTINUE,
    DETAILS_PREFIX,
    Answer,
    Continue,
    HeaderPairs,
    Immediate,
    continue_request_body,
    continue_request_headers,
    continue_response_body,
    continue_response_headers,
    error_response,
    immediate_json,
    reroute_request_body,
)
from extproc.core.routing import ModelRoute, compile_routes, describe_models, feast_views, resolve_route
from extproc.core.rows import Rows, Settled, body_rows, fetch_features, inject_rows
from extproc.core.rules import CompiledRule, RuleDecision, choose_version

__all__ = [
    "AUDIT_FULL",
    "CONTINUE",
    "DEGRADED_MISSING",
    "DETAILS_PREFIX",
    "MISSING",
    "STALE",
    "Answer",
    "BrokerProcessor",
    "CachedFeatureStore",
    "CompiledRule",
    "Continue",
    "DerivedFeature",
    "EmbeddedFeatureStore",
    "EntityKey",
    "EntityRef",
    "FeastKey",
    "FeastValueError",
    "FeastView",
    "FeatureRow",
    "FeatureStore",
    "Features",
    "HeaderPairs",
    "HttpBody",
    "HttpHeaders",
    "Immediate",
    "JSONObject",
    "KeyPlan",
    "LogicOutcome",
    "ModelLogic",
    "ModelRoute",
    "Processor",
    "ReadPlan",
    "RequestContext",
    "Rows",
    "RuleDecision",
    "Settled",
    "apply_logic",
    "body_rows",
    "check_content_type",
    "choose_version",
    "compile_logic",
    "compile_routes",
    "continue_request_body",
    "continue_request_headers",
    "continue_response_body",
    "continue_response_headers",
    "decode_value",
    "derive",
    "describe_models",
    "entity_key",
    "error_response",
    "feast_views",
    "fetch_features",
    "immediate_json",
    "inject_features",
    "inject_rows",
    "narrow",
    "parse_json_object",
    "pick",
    "reroute_request_body",
    "resolve_route",
    "settle_missing",
    "sticky_key",
]
