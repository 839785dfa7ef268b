"""The registry: one declarative file of models, versions, features, ensembles, consumers and audit.

One module per section; `checks` holds what crosses sections, `load` reads the file,
`reload` follows it while the broker runs. Imports only `extproc.wire`, and `extproc.expressions`
to compile every CEL expression at load.
"""

from extproc.registry.audit import Audit, AuditSinks, AwsAuditSink, LocalAuditSink, Spool
from extproc.registry.checks import Problem, RegistryInvalid, parse_registry
from extproc.registry.common import (
    ALL_ROUTES,
    TLS,
    Address,
    FeatureName,
    Port,
    Strict,
)
from extproc.registry.consumers import Consumer, JwtCredential, RateLimit, hash_api_key
from extproc.registry.document import Registry
from extproc.registry.ensembles import FIELD_METHODS, Aggregation, AggregationMethod, Ensemble, EnsembleMember
from extproc.registry.features import EmbeddedStore, Entity, FeatureCache, FeatureStore, RedisStore
from extproc.registry.load import LIVE_SECTIONS, file_signature, load_registry, restart_only_changes
from extproc.registry.logic import Derived, MissingPolicy, Rule, expression_scopes, logic_problems, rule_name
from extproc.registry.models import (
    LOOPBACK_HOSTS,
    Backend,
    CredentialSource,
    Model,
    RolloutPolicy,
    SageMakerBackend,
    ServiceBackend,
    Shadow,
    Sticky,
    Version,
)
from extproc.registry.open_inference import (
    BACKEND_INFER_SUFFIX,
    V2_PREFIX,
    Datatype,
    EntityKeySource,
    FeatureTensor,
    OpenInference,
    TensorElement,
    entity_key_source,
    infer_path,
    is_v2_path,
    open_inference_settings,
)
from extproc.registry.patterns import API_KEY_HASH, DNS_LABEL, FEATURE_NAME, JSON_KEY, describe
from extproc.registry.reload import POLL_SECONDS, log, refusal
from extproc.registry.serving import Admin, Broker, ControlPlane, Http2Limits, Limits, Listener, Metrics, Overload

__all__ = [
    "ALL_ROUTES",
    "API_KEY_HASH",
    "BACKEND_INFER_SUFFIX",
    "DNS_LABEL",
    "FEATURE_NAME",
    "FIELD_METHODS",
    "JSON_KEY",
    "LIVE_SECTIONS",
    "LOOPBACK_HOSTS",
    "POLL_SECONDS",
    "TLS",
    "V2_PREFIX",
    "Address",
    "Admin",
    "Aggregation",
    "AggregationMethod",
    "Audit",
    "AuditSinks",
    "AwsAuditSink",
    "Backend",
    "Broker",
    "Consumer",
    "ControlPlane",
    "CredentialSource",
    "Datatype",
    "Derived",
    "EmbeddedStore",
    "Ensemble",
    "EnsembleMember",
    "Entity",
    "EntityKeySource",
    "FeatureCache",
    "FeatureName",
    "FeatureStore",
    "FeatureTensor",
    "Http2Limits",
    "JwtCredential",
    "Limits",
    "Listener",
    "LocalAuditSink",
    "Metrics",
    "MissingPolicy",
    "Model",
    "OpenInference",
    "Overload",
    "Port",
    "Problem",
    "RateLimit",
    "RedisStore",
    "Registry",
    "RegistryInvalid",
    "RolloutPolicy",
    "Rule",
    "SageMakerBackend",
    "ServiceBackend",
    "Shadow",
    "Spool",
    "Sticky",
    "Strict",
    "TensorElement",
    "Version",
    "describe",
    "entity_key_source",
    "expression_scopes",
    "file_signature",
    "hash_api_key",
    "infer_path",
    "is_v2_path",
    "load_registry",
    "log",
    "logic_problems",
    "open_inference_settings",
    "parse_registry",
    "refusal",
    "restart_only_changes",
    "rule_name",
]
