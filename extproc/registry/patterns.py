"""The registry's name, path and URL patterns, each with the words `check` prints instead of the regular expression.

A field constrained by a pattern uses one of these constants; `describe` turns a
pattern back into "what a valid value looks like, e.g. …" for error messages.
"""

from __future__ import annotations

# A model or version name becomes part of Envoy cluster and stat names and,
# later, a Kubernetes object name: keep it a DNS label.
DNS_LABEL = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
FEATURE_NAME = r"^[A-Za-z_][A-Za-z0-9_.:-]{0,127}$"
# What `model-broker hash-key` prints: the algorithm is named so it can change later.
API_KEY_HASH = r"^sha256:[0-9a-f]{64}$"
JSON_KEY = r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$"
# A path Envoy matches exactly: no query, fragment, percent-encoding or spaces.
ROUTE_PATH = r"^/[A-Za-z0-9._~!$&'()*+,;=:@/-]*$"
ABSOLUTE_PATH = r"^/"
HEADER_NAME = r"^[a-z0-9][a-z0-9-]{0,63}$"
REDIS_URL = r"^(redis|rediss|unix)://"
HTTP_URL = r"^https?://"
# No user info: Envoy's JWKS cluster is built from the host and port alone.
JWKS_URL = r"^https?://[^/:]+(:\d+)?(/.*)?$"
AWS_REGION = r"^[a-z]{2}(-[a-z]+)+-\d$"
SAGEMAKER_NAME = r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$"
S3_BUCKET = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"
S3_PREFIX = r"^[A-Za-z0-9!_.*'()/-]{0,200}$"
DYNAMODB_TABLE = r"^[A-Za-z0-9_.-]{3,255}$"
FIELD_PATH = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$"
# Open Inference Protocol: an input tensor's name, a request `parameters` entry's name.
TENSOR_NAME = r"^[A-Za-z_][A-Za-z0-9_.:/-]{0,127}$"
PARAMETER_NAME = r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$"
# Feast's names: views and services (letters, digits, '_', '-'), projects (letters, digits, '_').
FEAST_NAME = r"^[A-Za-z_][A-Za-z0-9_-]{0,127}$"
FEAST_PROJECT = r"^[A-Za-z0-9_]{1,128}$"
# MLflow's alias rule: letters, digits, `_` and `-`; `latest` and `v<N>` are reserved (model_registry checks).
MLFLOW_ALIAS = r"^[A-Za-z0-9_-]{1,255}$"

# pattern → (what a valid value looks like, an example of one)
_WORDS: dict[str, tuple[str, str]] = {
    DNS_LABEL: (
        "a DNS label (1 to 63 lowercase letters, digits or '-', starting and ending with a letter or digit)",
        "credit-risk",
    ),
    FEATURE_NAME: (
        "a feature name (a letter or '_', then up to 127 letters, digits or '_', '.', ':', '-')",
        "debt_ratio",
    ),
    API_KEY_HASH: (
        "'sha256:' and 64 lowercase hex digits, as `model-broker hash-key` prints",
        "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    ),
    JSON_KEY: ("a JSON field name (a letter or '_', then up to 63 letters, digits, '_' or '-')", "customer_id"),
    ROUTE_PATH: (
        "a URL path starting with '/', without spaces, '?', '#' or '%'",
        "/v1/models/credit-risk/predict",
    ),
    ABSOLUTE_PATH: ("a URL path starting with '/'", "/predict"),
    HEADER_NAME: ("a lowercase HTTP header name (up to 64 letters, digits or '-')", "x-user-id"),
    REDIS_URL: ("a redis://, rediss:// or unix:// URL", "redis://127.0.0.1:6379/0"),
    HTTP_URL: ("an http:// or https:// URL", "https://s3.eu-west-1.amazonaws.com"),
    JWKS_URL: (
        "an http:// or https:// URL with a host and optional port, no user name",
        "https://login.example.com/.well-known/jwks.json",
    ),
    AWS_REGION: ("an AWS region name", "eu-west-1"),
    SAGEMAKER_NAME: (
        "a SageMaker name (1 to 63 letters, digits or '-', starting and ending with a letter or digit)",
        "credit-risk-v2",
    ),
    S3_BUCKET: (
        "an S3 bucket name (3 to 63 lowercase letters, digits, '.' or '-', starting and ending with a letter or digit)",
        "model-broker-audit",
    ),
    S3_PREFIX: ("an S3 key prefix (up to 200 letters, digits or !_.*'()/-)", "audit/prod"),
    DYNAMODB_TABLE: ("a DynamoDB table name (3 to 255 letters, digits, '_', '.' or '-')", "model-broker-audit"),
    TENSOR_NAME: (
        "a tensor name (a letter or '_', then up to 127 letters, digits or '_', '.', ':', '/', '-')",
        "input-0",
    ),
    PARAMETER_NAME: (
        "a parameter name (a letter or '_', then up to 63 letters, digits or '_', '.', '-')",
        "customer_id",
    ),
    FIELD_PATH: ("a field path (names of letters, digits, '_' or '-' joined by '.')", "contact.email"),
    FEAST_NAME: ("a Feast name (a letter or '_', then up to 127 letters, digits, '_' or '-')", "customer_stats"),
    FEAST_PROJECT: ("a Feast project name (1 to 128 letters, digits or '_')", "fraud_detection"),
    MLFLOW_ALIAS: ("an MLflow alias (1 to 255 letters, digits, '_' or '-')", "champion"),
}


def describe(pattern: str) -> str | None:
    """'<words>, e.g. <example>' for a registry pattern; None for one this module does not know."""
    words = _WORDS.get(pattern)
    return None if words is None else f"{words[0]}, e.g. {words[1]}"


def known() -> frozenset[str]:
    """Every pattern that has words (a test checks the schema uses no other)."""
    return frozenset(_WORDS)
