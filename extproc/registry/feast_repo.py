"""The registry's Feast section against the Feast repo itself (`model-broker check --feast-repo`).

`feast_describe.py` prints the repo as JSON from an environment with the Feast SDK;
`compare_feast_repo` (pure) says what does not match: problems fail the check, warnings do not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from extproc.registry.document import Registry
from extproc.registry.feast_refs import model_refs
from extproc.registry.features import FeastStore

# Feast's ValueType names of the join-key types the broker serializes.
_VALUE_TYPES = {"string": "STRING", "int64": "INT64", "int32": "INT32"}


@dataclass
class FeastReport:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # One line per model reference: its type and its view's TTL, as the repo has them.
    references: list[str] = field(default_factory=list)


def compare_feast_repo(reg: Registry, repo: dict[str, Any]) -> FeastReport:
    report = FeastReport()
    feast = reg.feature_store.feast
    if feast is None:
        report.problems.append("the registry has no feature_store.feast section to compare")
        return report
    if repo["project"] != feast.project:
        report.problems.append(f"project: the registry reads '{feast.project}', the repo is '{repo['project']}'")
    _online_store(feast, repo.get("online_store", {}), report)
    entities = {e["name"]: e for e in repo["entities"]}
    views = {v["name"]: v for v in repo["feature_views"]}
    services = {s["name"]: s for s in repo["feature_services"]}
    _entities(reg, entities, report)
    _views_and_services(feast, views, services, report)
    for model in reg.models:
        _model_refs(model.name, model_refs(reg, model), views, report)
    return report


def _online_store(feast: FeastStore, online: dict[str, Any], report: FeastReport) -> None:
    """The repo's online store must be the Redis the registry reads, of the same kind (one Redis or a cluster)."""
    kind, redis_type = online.get("type"), online.get("redis_type") or "redis"
    if kind != "redis":
        report.problems.append(
            f"online store: the repo's feature_store.yaml has type {kind!r}; "
            "the broker reads Feast's Redis online store"
        )
    elif redis_type != feast.redis.redis_type:
        report.problems.append(
            f"online store: the repo's feature_store.yaml has redis_type {redis_type}, "
            f"the registry's feature_store.feast.redis has redis_type {feast.redis.redis_type}"
        )


def _entities(reg: Registry, entities: dict[str, Any], report: FeastReport) -> None:
    for entity in reg.entities:
        found = entities.get(entity.name)
        if found is None:
            continue  # an entity no Feast view uses (the views' check below names the ones that matter)
        expected = _VALUE_TYPES[entity.value_type]
        if found["join_key"] != entity.join_key or found["value_type"] != expected:
            report.problems.append(
                f"entity '{entity.name}': the registry has join key {entity.join_key} ({expected}), "
                f"the repo {found['join_key']} ({found['value_type']})"
            )


def _views_and_services(
    feast: FeastStore, views: dict[str, Any], services: dict[str, Any], report: FeastReport
) -> None:
    for view in feast.feature_views:
        here = f"feature view '{view.name}'"
        found = views.get(view.name)
        if found is None:
            report.problems.append(f"{here} is not in the repo (known: {', '.join(sorted(views)) or 'none'})")
            continue
        if sorted(found["entities"]) != sorted(view.entities):
            report.problems.append(
                f"{here}: entities {list(view.entities)} in the registry, {found['entities']} in the repo"
            )
        if found["ttl_seconds"] != view.ttl_seconds:
            report.problems.append(
                f"{here}: ttl_seconds {view.ttl_seconds:g} in the registry, {found['ttl_seconds']:g} in the repo"
            )
    for service in feast.feature_services:
        repo_service = services.get(service.name)
        if repo_service is None:
            report.problems.append(f"feature service '{service.name}' is not in the repo")
        elif sorted(repo_service["features"]) != sorted(service.features):
            report.problems.append(
                f"feature service '{service.name}': {sorted(service.features)} in the registry, "
                f"{sorted(repo_service['features'])} in the repo"
            )


def _model_refs(model: str, refs: tuple[str, ...], views: dict[str, Any], report: FeastReport) -> None:
    unmaterialized: set[str] = set()
    for ref in refs:
        view_name, _, feature = ref.partition(":")
        view = views.get(view_name)
        if view is None:
            continue  # reported with the views
        types = {f["name"]: f["type"] for f in view["features"]}
        if feature not in types:
            report.problems.append(f"model '{model}': '{ref}' is not a feature of view '{view_name}'")
            continue
        ttl = f"ttl {view['ttl_seconds']:g} s" if view["ttl_seconds"] else "no ttl"
        report.references.append(f"{model}: {ref} ({types[feature]}, {ttl})")
        if not view["materialized"]:
            unmaterialized.add(view_name)
    for view_name in sorted(unmaterialized):
        report.warnings.append(
            f"model '{model}' needs view '{view_name}', which has never been materialized "
            "(fine if rows are pushed with write_to_online_store)"
        )
