"""A request's rows: the entities a body names, their features under the model's policies, injected back.

A plain body is one row; a model with `batch` takes a list of rows under a declared
field, all fetched in the same single store call, each injected with its own features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from extproc import metrics
from extproc.core.body import JSONObject
from extproc.core.entity import EntityRef
from extproc.core.features import FeatureRow, Features, FeatureStore
from extproc.core.routing import ModelRoute
from extproc.errors import BrokerError, ErrorCode, FeatureStoreUnavailable

PRESENT = "present"


@dataclass(frozen=True, slots=True)
class Rows:
    """The body's rows and the entity each names; `batched` when they came from the batch field."""

    rows: list[JSONObject]
    refs: list[EntityRef]
    batched: bool = False

    @property
    def label(self) -> str:
        """How the audit record names the entities: one label, or all of a batch."""
        return "; ".join(ref.label for ref in self.refs)


@dataclass(frozen=True, slots=True)
class Settled:
    """Each row's features to inject, why some are absent (a policy let it pass), and each feature's status."""

    features: list[Features]
    degraded: str
    statuses: list[dict[str, str]]

    def audit_features(self, batched: bool) -> Any:
        return self.features if batched else self.features[0]

    def audit_statuses(self, batched: bool) -> Any:
        return self.statuses if batched else self.statuses[0]


def body_rows(doc: JSONObject, route: ModelRoute) -> Rows | BrokerError:
    """The rows a body carries (the batch field's list when present), and the entity of each."""
    field = route.batch_field
    if field is None or field not in doc:
        ref = route.keys.ref(doc)
        return ref if isinstance(ref, BrokerError) else Rows([doc], [ref])
    items = doc[field]
    if not isinstance(items, list) or not items or not all(isinstance(r, dict) for r in items):
        return BrokerError(ErrorCode.INVALID_BODY, f"'{field}' must be a non-empty array of objects (one per row)")
    if len(items) > route.max_rows:
        return BrokerError(
            ErrorCode.TOO_MANY_ROWS, f"'{field}' has {len(items)} rows; this model takes at most {route.max_rows}"
        )
    refs = []
    for i, row in enumerate(items):
        ref = route.keys.ref(row)
        if isinstance(ref, BrokerError):
            return BrokerError(ref.code, f"{field}[{i}]: {ref.message}")
        refs.append(ref)
    return Rows(items, refs, batched=True)


async def fetch_features(store: FeatureStore, route: ModelRoute, rows: Rows) -> Settled | BrokerError:
    """Every row's features in one store call, with the model's policies applied to each row."""
    try:
        found = await store.fetch_rows([ref.key for ref in rows.refs], route.features)
    except FeatureStoreUnavailable as exc:
        features, degraded = route.settle_unavailable(str(exc))
        if isinstance(features, BrokerError):
            return features
        return Settled([features] * len(rows.rows), degraded, [{}] * len(rows.rows))
    settled: list[Features] = []
    statuses: list[dict[str, str]] = []
    degraded = ""
    for i, (row, ref) in enumerate(zip(found, rows.refs, strict=True)):
        features, why = route.settle_features(row, ref.label)
        if isinstance(features, BrokerError):
            return (
                BrokerError(features.code, f"{route.batch_field}[{i}]: {features.message}")
                if rows.batched
                else features
            )
        status = feature_statuses(route.features, row)
        metrics.record_feature_status(route.model, status)
        settled.append(features)
        statuses.append(status)
        degraded = degraded or why
    return Settled(settled, degraded, statuses)


def feature_statuses(names: tuple[str, ...], row: FeatureRow | None) -> dict[str, str]:
    """present, missing or stale for each requested feature (all missing for an unknown entity)."""
    if row is None:
        return dict.fromkeys(names, "missing")
    return {name: row.absent.get(name, PRESENT) for name in names}


def inject_rows(doc: JSONObject, rows: Rows, inject_as: str, features: list[Features]) -> bytes:
    """The enriched body: each row's injected key replaced by its own features."""
    for row, found in zip(rows.rows, features, strict=True):
        row[inject_as] = found
    return orjson.dumps(doc)
