"""A model's declared policy for features it needs and cannot have: refuse, forward degraded, or null.

Shared by every way a feature can go missing (absent from the store, a derived one whose
expression failed), so a model answers the same way whatever the cause.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from extproc.errors import BrokerError, ErrorCode
from extproc.registry import MissingPolicy

# The `x-broker-degraded` value of a request forwarded without some of its features.
DEGRADED_MISSING = "missing-features"


def settle_missing(
    policy: MissingPolicy, features: dict[str, Any], missing: Mapping[str, str]
) -> tuple[dict[str, Any] | BrokerError, str]:
    """Apply `policy` to `missing` ({feature: why}); the features to send on and the degraded reason.

    reject: an error naming every missing feature and why; forward_degraded: sent without them,
    marked degraded; null: sent with each as null (the model was declared to cope).
    """
    if not missing:
        return features, ""
    if policy == "reject":
        reasons = "; ".join(f"'{name}': {why}" for name, why in missing.items())
        return BrokerError(ErrorCode.MISSING_FEATURES, f"features the model needs are missing: {reasons}"), ""
    if policy == "null":
        return {**features, **dict.fromkeys(missing)}, ""
    return {k: v for k, v in features.items() if k not in missing}, DEGRADED_MISSING
