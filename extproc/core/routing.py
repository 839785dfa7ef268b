"""From Envoy's route name to everything the broker needs for that model.

Envoy has already matched the path (routes are generated from the registry), so
resolving a route is one dict lookup on the route name Envoy reports.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from extproc import wire
from extproc.core.entity import KeyPlan
from extproc.core.feast_read import FeastView
from extproc.core.features import FeatureRow, Features
from extproc.core.logic import ModelLogic, compile_logic
from extproc.core.missing import settle_missing
from extproc.core.oip import OipPlan, compile_plan
from extproc.errors import BrokerError, ErrorCode
from extproc.registry import MissingPolicy, Model, Registry, injected_name, model_refs, rule_name


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """One model's request plan, compiled once at load so the hot path only reads it."""

    model: str
    keys: KeyPlan
    # What the store is asked for, and the name each is injected under (Feast: `view:feature` → `feature`).
    features: tuple[str, ...]
    inject_as: str
    fail_open: bool
    forward_unknown_entity: bool
    # Body field copied into wire.HEADER_STICKY_KEY (sticky A/B); None on plain routes.
    sticky_field: str | None = None
    # Client header Envoy hashes (`sticky.header`); a rule's sub-split hashes it too.
    sticky_header: str | None = None
    # Open Inference Protocol models: how the request carries keys and takes features; None for JSON.
    oip: OipPlan | None = None
    # Derived features and segment rules (CEL); None when the model declares neither.
    logic: ModelLogic | None = None
    # Versions taken out of traffic live (rolled back, or set to 0): never pinned by a rule.
    withdrawn: frozenset[str] = frozenset()
    # What a row missing some of its features becomes (the model's `missing_features`).
    missing_features: MissingPolicy = "reject"
    injected_names: tuple[str, ...] = ()
    # Batch requests: the body field holding the rows, and how many it may hold.
    batch_field: str | None = None
    max_rows: int = 1

    @property
    def join_key(self) -> str:
        return self.keys.join_key

    def settle_unavailable(self, why: str) -> tuple[Features | BrokerError, str]:
        """The model's failure policy when the store failed (`why`)."""
        if self.fail_open:  # declared fail-open: the model copes without features
            return {}, "feature_store_unavailable"
        return BrokerError(ErrorCode.FEATURE_STORE_UNAVAILABLE, f"the feature store is unavailable ({why})"), ""

    def settle_features(self, row: FeatureRow | None, label: str) -> tuple[Features | BrokerError, str]:
        """The model's policies applied to one entity's row (`label` names the entity, never a store key).

        Returns the features to inject, and why some are missing when a policy let that pass.
        """
        if row is None:
            if self.forward_unknown_entity:
                return {}, "unknown_entity"
            return BrokerError(ErrorCode.UNKNOWN_ENTITY, f"no features are stored for {self._entity(label)}"), ""
        names = self.injected_names or self.features
        values = row.values if names == self.features else row.renamed(self.features, names)
        if not row.absent:
            return values, ""
        # Each absent feature by the name the model knows, and why (with its reference when they differ).
        absent = {
            name: why if name == ref else f"{why} ({ref})"
            for ref, name in zip(self.features, names, strict=True)
            if (why := row.absent.get(ref))
        }
        settled, degraded = settle_missing(self.missing_features, values, absent)
        if isinstance(settled, BrokerError):  # errors name the entity by its key, never by a store key
            return BrokerError(settled.code, f"{self._entity(label)}: {settled.message}"), ""
        return settled, degraded

    def _entity(self, label: str) -> str:
        if len(self.keys.join_keys) == 1:
            return f"{self.join_key} '{label}'"
        return f"the entity ({label})"


def withdrawn_versions(live: Model, declared: Model | None) -> frozenset[str]:
    """Versions the registry gives traffic that have none live: a rollback, or `weights set … v=0`.

    A version declared at weight 0 (reached through rules only) stays available to rules.
    """
    if declared is None:
        return frozenset()
    was = {v.name: v.weight for v in declared.versions}
    return frozenset(v.name for v in live.versions if v.weight == 0 and was.get(v.name, 0) > 0)


def compile_routes(registry: Registry, declared: Registry | None = None) -> dict[str, ModelRoute]:
    """Every model's plan; `declared` is the registry file as written, when `registry` carries live weights."""
    routes: dict[str, ModelRoute] = {}
    feast = registry.feature_store.feast
    for model in registry.models:
        entity = registry.entity(model.entity)
        if entity is None:  # parse_registry already rejected this; kept for the type checker
            raise ValueError(f"model {model.name}: unknown entity {model.entity}")
        features = model_refs(registry, model)
        if feast is None:
            prefix, _, suffix = entity.key_template.partition("{" + entity.join_key + "}")
            keys = KeyPlan(((entity.join_key, entity.value_type),), prefix=prefix, suffix=suffix)
            injected = features
        else:
            keys = KeyPlan(_feast_join_keys(registry, features) or ((entity.join_key, entity.value_type),), feast=True)
            injected = tuple(injected_name(ref, feast.full_feature_names) for ref in features)
        routes[model.name] = ModelRoute(
            model=model.name,
            keys=keys,
            features=features,
            inject_as=model.inject_as,
            fail_open=model.failure_policy == "fail_open",
            forward_unknown_entity=model.unknown_entity == "forward",
            sticky_field=model.sticky.body_field if model.sticky is not None else None,
            sticky_header=model.sticky.header if model.sticky is not None else None,
            oip=compile_plan(model, entity.join_key) if model.protocol == "open_inference" else None,
            logic=compile_logic(model),
            withdrawn=withdrawn_versions(model, declared.model(model.name) if declared is not None else None),
            missing_features=model.missing_features,
            injected_names=injected,
            batch_field=model.batch.field if model.batch is not None else None,
            max_rows=model.batch.max_rows if model.batch is not None else 1,
        )
    return routes


def named_version_routes(registry: Registry, routes: dict[str, ModelRoute]) -> dict[str, ModelRoute]:
    """Each OIP model's `…/versions/<v>/infer` route: the model's plan without its segment rules (the
    client named the version; derived features still apply), under the route name Envoy reports."""
    named: dict[str, ModelRoute] = {}
    for model in registry.models:
        route = routes.get(model.name)
        if route is None or route.oip is None:
            continue
        logic = dataclasses.replace(route.logic, rules=()) if route.logic is not None else None
        plain = dataclasses.replace(route, logic=logic)
        for version in model.versions:
            named[wire.oip_route("infer", model.name, version.name)] = plain
    return named


def _describe_rule(model: Model, index: int) -> dict[str, Any]:
    rule = model.rules[index]
    target: dict[str, Any] = {"version": rule.version} if rule.version is not None else {"split": rule.split}
    return {"name": rule_name(rule, index), "when": rule.when, **target}


def _feast_join_keys(registry: Registry, refs: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """Every join key the views of `refs` are keyed by, in first-use order."""
    views = feast_views(registry)
    keys = dict.fromkeys(jk for ref in refs for jk in views[ref.partition(":")[0]].join_keys)
    return tuple(keys)


def feast_views(registry: Registry) -> dict[str, FeastView]:
    """The declared feature views as the Feast reader needs them (join keys with their value types)."""
    feast = registry.feature_store.feast
    if feast is None:
        return {}
    views = {}
    for view in feast.feature_views:
        join_keys = []
        for name in view.entities:
            entity = registry.entity(name)
            if entity is None:  # parse_registry already rejected this; kept for the type checker
                raise ValueError(f"feature view {view.name}: unknown entity {name}")
            join_keys.append((entity.join_key, entity.value_type))
        views[view.name] = FeastView(view.name, tuple(join_keys), view.ttl_seconds)
    return views


def resolve_route(routes: dict[str, ModelRoute], route_name: str) -> ModelRoute | BrokerError:
    route = routes.get(route_name)
    if route is None:
        # Envoy routed here but the broker's registry has no such model: the two are out of step.
        return BrokerError(ErrorCode.UNKNOWN_MODEL, f"no model is registered for route '{route_name}'")
    return route


def describe_models(registry: Registry) -> dict[str, Any]:
    """The body of `GET /models`: what a platform team needs to see, nothing secret."""
    total = {m.name: sum(v.weight for v in m.versions) or 1 for m in registry.models}
    return {
        "registry_version": registry.registry_version,
        "models": [
            {
                "name": m.name,
                "path": m.path,
                "protocol": m.protocol,
                "entity": m.entity,
                "features": list(model_refs(registry, m)),
                "failure_policy": m.failure_policy,
                "missing_features": m.missing_features,
                "derived": [d.model_dump() for d in m.derived],
                "rules": [_describe_rule(m, k) for k in range(len(m.rules))],
                "versions": [
                    {
                        "name": v.name,
                        "weight": v.weight,
                        "traffic_percent": round(100 * v.weight / total[m.name], 2),
                        "backend": "sagemaker" if v.backend.sagemaker else "service",
                        "cluster": wire.version_cluster(m.name, v.name),
                    }
                    for v in m.versions
                ],
            }
            for m in registry.models
        ],
        "ensembles": [
            {
                "name": e.name,
                "path": e.path,
                "members": [{"model": m.model, "timeout_ms": m.timeout_ms} for m in e.members],
                "deadline_ms": e.deadline_ms,
                "min_success": e.required_successes,
                "aggregation": e.aggregation.model_dump(exclude_none=True),
            }
            for e in registry.ensembles
        ],
    }


def with_ground_truth(doc: Mapping[str, Any], registry: Registry, summary: Mapping[str, Any]) -> dict[str, Any]:
    """`GET /models` with each feedback model's labels: per version (and shadow) count and accuracy or MAE."""
    declared = {m.name: m.feedback for m in registry.models if m.feedback is not None}
    models = []
    for entry in doc["models"]:
        conf = declared.get(entry["name"])
        if conf is None:
            models.append(entry)
            continue
        found = summary.get(entry["name"], {})
        truth = {
            "kind": conf.kind,
            "answer_field": conf.answer_field,
            "versions": found.get("versions", {}),
            "shadows": found.get("shadows", {}),
        }
        models.append({**entry, "ground_truth": truth})
    return {**doc, "models": models}
