"""The one workload every configuration serves: the request, the features, the seeded customers.

Shared by the gateways and the bench driver so every configuration does exactly
the same work on exactly the same data.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

MODEL: Final = "credit-risk"
MODEL_PATH: Final = "/v1/models/credit-risk/predict"
# The ensemble configurations: members are copies of MODEL on the same backend, so only the fan-out differs.
ENSEMBLE: Final = "underwriting"
ENSEMBLE_PATH: Final = "/v1/ensembles/underwriting/predict"
BACKEND_PATH: Final = "/predict"
JOIN_KEY: Final = "customer_id"
INJECT_AS: Final = "features"
FEATURES: Final = ("income", "debt_ratio", "tenure_months", "late_payments_12m")
# The Feast configurations: the same features in one feature view of a Feast repo, and `feast serve`'s route.
FEAST_PROJECT: Final = "bench"
FEAST_VIEW: Final = "customer_features"
FEAST_SERVE_PATH: Final = "/get-online-features"
# Enough distinct customers that a load run measures the store path, not only a warm cache.
CUSTOMERS: Final = 1000
# The broker's feature-store budget; the gateways get the same one.
STORE_TIMEOUT_MS: Final = 50
JSON: Final = "application/json"


def customer_id(index: int) -> str:
    return f"c-{index}"


def store_key(customer: str) -> str:
    """Redis hash of one customer, as the registry's `store_key` template spells it."""
    return f"customer:{customer}"


def customer_features(index: int) -> dict[str, int | float]:
    """Deterministic, varied feature values: reruns see identical data."""
    return {
        "income": 20_000 + (index * 7919) % 130_000,
        "debt_ratio": round((index * 37 % 90) / 100, 2),
        "tenure_months": index * 13 % 240,
        "late_payments_12m": index % 5,
    }


def request_body(index: int) -> bytes:
    return orjson.dumps({JOIN_KEY: customer_id(index), "amount": 100 + index * 37 % 5000})


def feast_body(index: int) -> bytes:
    """`feast serve`'s lookup of the same features for the same customer."""
    features = [f"{FEAST_VIEW}:{name}" for name in FEATURES]
    return orjson.dumps({"features": features, "entities": {JOIN_KEY: [customer_id(index)]}})


def decode_value(raw: bytes | str) -> Any:
    """Store values are JSON scalars when they parse as JSON, else strings (the broker's rule)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw if isinstance(raw, str) else raw.decode("utf-8", errors="replace")
