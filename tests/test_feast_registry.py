"""The `feature_store.feast` section and what models ask of it: every mistake named at its field path."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from extproc.core.routing import compile_routes
from extproc.registry import RegistryInvalid, compare_feast_repo, parse_registry

VERSIONS = [{"name": "v1", "weight": 100, "backend": {"service": {"host": "a", "port": 80}}}]
BASE: dict[str, Any] = {
    "feature_store": {
        "feast": {
            "redis": {"url": "redis://127.0.0.1:6379/0"},
            "project": "fraud",
            "feature_views": [
                {"name": "customer_stats", "entities": ["customer"], "ttl_seconds": 86400},
                {"name": "pair_stats", "entities": ["merchant", "customer"]},
            ],
            "feature_services": [{"name": "risk", "features": ["customer_stats:txn_count", "pair_stats:n"]}],
        }
    },
    "entities": [
        {"name": "customer", "join_key": "customer_id", "value_type": "int64"},
        {"name": "merchant", "join_key": "merchant_id"},
    ],
    "models": [
        {
            "name": "fraud",
            "path": "/fraud",
            "entity": "customer",
            "feature_service": "risk",
            "features": ["customer_stats:segment"],
            "versions": VERSIONS,
        }
    ],
}


def changed(change: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    change(doc)
    return doc


def problems(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(RegistryInvalid) as caught:
        parse_registry(doc)
    return [str(p) for p in caught.value.problems]


def test_a_feast_model_compiles_to_typed_composite_keys() -> None:
    """Service features come first, Feast's short names are injected, join keys are the views' union."""
    route = compile_routes(parse_registry(BASE))["fraud"]
    assert route.features == ("customer_stats:txn_count", "pair_stats:n", "customer_stats:segment")
    assert route.injected_names == ("txn_count", "n", "segment")
    assert route.keys.feast and route.keys.join_keys == (("customer_id", "int64"), ("merchant_id", "string"))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda d: d["feature_store"]["feast"].update(entity_key_serialization_version=2),
            "feature_store.feast.entity_key_serialization_version: Value error, version 2 is not supported",
        ),
        (
            lambda d: d["models"][0].update(features=["nope:x"]),
            "models[0].features[0]: unknown feature view 'nope' (declared: customer_stats, pair_stats)",
        ),
        (
            lambda d: d["models"][0].update(features=["segment"]),
            "models[0].features[0]: 'segment' is not a Feast feature reference ('view:feature')",
        ),
        (
            lambda d: d["models"][0].update(feature_service="gone"),
            "models[0].feature_service: unknown feature service 'gone' (known: risk)",
        ),
        (
            lambda d: d["feature_store"]["feast"]["feature_views"][1].update(entities=["store"]),
            "feature_store.feast.feature_views[1].entities[0]: unknown entity 'store'",
        ),
        (
            lambda d: d["models"][0].update(features=["pair_stats:txn_count"]),
            "models[0].features: 'pair_stats:txn_count' and 'customer_stats:txn_count' are both injected as "
            "'txn_count'; set feature_store.feast.full_feature_names to tell them apart",
        ),
        (
            lambda d: d["models"][0].update(batch={"field": "rows"}, rules=[{"when": "true", "version": "v1"}]),
            "models[0].batch: derived features and rules take one row; drop 'batch' or them",
        ),
        (
            lambda d: d.update(feature_store={"embedded": {"path": "f.json"}}),
            "models[0].feature_service: feature services need 'feature_store.feast'",
        ),
        (
            lambda d: d["feature_store"]["feast"]["redis"].update(url="redis://a:6379/2", redis_type="redis_cluster"),
            "feature_store.feast.redis: Value error, a Redis Cluster has only database 0, the URL selects '2'",
        ),
        (
            lambda d: d["feature_store"]["feast"]["redis"].update(url="unix:///r.sock", redis_type="redis_cluster"),
            "feature_store.feast.redis: Value error, a Redis Cluster is reached over TCP",
        ),
        (
            lambda d: d["feature_store"]["feast"]["redis"].update(redis_type="cluster"),
            "feature_store.feast.redis.redis_type: Input should be 'redis' or 'redis_cluster'",
        ),
    ],
    ids=[
        "serialization-v2",
        "unknown-view",
        "not-a-reference",
        "unknown-service",
        "unknown-entity",
        "same-short-name",
        "batch-with-rules",
        "service-without-feast",
        "cluster-db-2",
        "cluster-unix-socket",
        "unknown-redis-type",
    ],
)
def test_feast_problems_are_named(change: Any, expected: str) -> None:
    """Each mistake is one problem at its field path, in words a Feast user recognises."""
    found = problems(changed(change))
    assert any(p.startswith(expected) for p in found), found


def test_full_feature_names_tell_views_apart() -> None:
    """With full_feature_names the same feature of two views is injected as `view__feature`, as Feast names it."""
    doc = changed(lambda d: d["models"][0].update(features=["pair_stats:txn_count"]))
    doc["feature_store"]["feast"]["full_feature_names"] = True
    route = compile_routes(parse_registry(doc))["fraud"]
    assert route.injected_names == ("customer_stats__txn_count", "pair_stats__n", "pair_stats__txn_count")


def repo_like(online_store: dict[str, Any]) -> dict[str, Any]:
    """What `feast_describe.py` prints for a repo that matches BASE, with the given online store."""
    feature = {"name": "txn_count", "type": "Int64"}
    return {
        "project": "fraud",
        "online_store": online_store,
        "entities": [
            {"name": "customer", "join_key": "customer_id", "value_type": "INT64"},
            {"name": "merchant", "join_key": "merchant_id", "value_type": "STRING"},
        ],
        "feature_views": [
            {
                "name": "customer_stats",
                "entities": ["customer"],
                "ttl_seconds": 86400,
                "features": [feature, {"name": "segment", "type": "String"}],
                "materialized": True,
            },
            {
                "name": "pair_stats",
                "entities": ["merchant", "customer"],
                "ttl_seconds": 0,
                "features": [{"name": "n", "type": "Int64"}],
                "materialized": True,
            },
        ],
        "feature_services": [{"name": "risk", "features": ["customer_stats:txn_count", "pair_stats:n"]}],
    }


@pytest.mark.parametrize(
    ("registry_type", "online_store", "expected"),
    [
        ("redis", {"type": "redis", "redis_type": "redis"}, []),
        ("redis_cluster", {"type": "redis", "redis_type": "redis_cluster"}, []),
        (
            "redis",
            {"type": "redis", "redis_type": "redis_cluster"},
            [
                "online store: the repo's feature_store.yaml has redis_type redis_cluster, "
                "the registry's feature_store.feast.redis has redis_type redis"
            ],
        ),
        (
            "redis_cluster",
            {"type": "redis", "redis_type": "redis_sentinel"},
            [
                "online store: the repo's feature_store.yaml has redis_type redis_sentinel, "
                "the registry's feature_store.feast.redis has redis_type redis_cluster"
            ],
        ),
        (
            "redis",
            {"type": "sqlite", "redis_type": None},
            [
                "online store: the repo's feature_store.yaml has type 'sqlite'; "
                "the broker reads Feast's Redis online store"
            ],
        ),
    ],
    ids=["redis", "cluster", "repo-is-a-cluster", "repo-is-sentinel", "not-redis"],
)
def test_online_store_kind_matches_the_repo(
    registry_type: str, online_store: dict[str, Any], expected: list[str]
) -> None:
    """`check --feast-repo` fails a registry that reads the repo's Redis as the wrong kind (one Redis or a cluster)."""
    doc = changed(lambda d: d["feature_store"]["feast"]["redis"].update(redis_type=registry_type))
    report = compare_feast_repo(parse_registry(doc), repo_like(online_store))
    assert report.problems == expected
