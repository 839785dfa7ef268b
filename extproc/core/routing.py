"""From Envoy's route name to everything the broker needs for that model.

Envoy has already matched the path (routes are generated from the registry), so
resolving a route is one dict lookup on the route name Envoy reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from extproc import wire
from extproc.core.features import Features
from extproc.core.logic import ModelLogic, compile_logic
from extproc.core.oip import OipPlan, compile_plan
from extproc.errors import BrokerError, ErrorCode
from extproc.registry import Model, Registry, rule_name


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """One model's request plan, compiled once at load so the hot path only reads it."""

    model: str
    join_key: str
    key_prefix: str
    key_suffix: str
    features: tuple[str, ...]
    inject_as: str
    fail_open: bool
    forward_unknown_entity: bool
    # Body field copied into wire.HEADER_STICKY_KEY (sticky A/B); None on plain routes.
    sticky_field: str | None = None
    # Open Inference Protocol models: how the request carries keys and takes features; None for JSON.
    oip: OipPlan | None = None
    # Derived features and segment rules (CEL); None when the model declares neither.
    logic: ModelLogic | None = None
    # Versions taken out of traffic live (rolled back, or set to 0): never pinned by a rule.
    withdrawn: frozenset[str] = frozenset()

    def store_key(self, entity_key: str) -> str:
        return self.key_prefix + entity_key + self.key_suffix

    def settle_features(
        self, found: Features | None, key: str, unavailable: str = ""
    ) -> tuple[Features | BrokerError, str]:
        """The model's failure policies applied to one store outcome (`unavailable`: why the store failed).

        Returns the features to inject, and why they are missing when a policy let that pass.
        """
        if unavailable:
            if self.fail_open:  # declared fail-open: the model copes without features
                return {}, "feature_store_unavailable"
            return BrokerError(
                ErrorCode.FEATURE_STORE_UNAVAILABLE, f"the feature store is unavailable ({unavailable})"
            ), ""
        if found is None:
            if self.forward_unknown_entity:
                return {}, "unknown_entity"
            return BrokerError(ErrorCode.UNKNOWN_ENTITY, f"no features are stored for {self.join_key} '{key}'"), ""
        return found, ""


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
    for model in registry.models:
        entity = registry.entity(model.entity)
        if entity is None:  # parse_registry already rejected this; kept for the type checker
            raise ValueError(f"model {model.name}: unknown entity {model.entity}")
        prefix, _, suffix = entity.key_template.partition("{" + entity.join_key + "}")
        routes[model.name] = ModelRoute(
            model=model.name,
            join_key=entity.join_key,
            key_prefix=prefix,
            key_suffix=suffix,
            features=model.required_features,
            inject_as=model.inject_as,
            fail_open=model.failure_policy == "fail_open",
            forward_unknown_entity=model.unknown_entity == "forward",
            sticky_field=model.sticky.body_field if model.sticky is not None else None,
            oip=compile_plan(model, entity.join_key) if model.protocol == "open_inference" else None,
            logic=compile_logic(model),
            withdrawn=withdrawn_versions(model, declared.model(model.name) if declared is not None else None),
        )
    return routes


def _describe_rule(model: Model, index: int) -> dict[str, Any]:
    rule = model.rules[index]
    target: dict[str, Any] = {"version": rule.version} if rule.version is not None else {"split": rule.split}
    return {"name": rule_name(rule, index), "when": rule.when, **target}


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
                "features": list(m.required_features),
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
