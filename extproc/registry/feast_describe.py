"""Print a Feast repo as JSON: entities, feature views (entities, TTL, typed features), services.

Run by `model-broker check --feast-repo` with the Python of an environment that has
the `feast` SDK (its pins clash with the broker's, so never this one):
    <feast-python> feast_describe.py REPO_DIR
Reads the repo's registry as `feast apply` left it; writes nothing.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def describe(repo: str) -> dict[str, Any]:
    from feast import FeatureStore  # only in the Feast environment: this module imports anywhere

    store = FeatureStore(repo_path=repo)
    entities = {e.name: e for e in store.list_entities()}
    online = store.config.online_store
    redis_type = getattr(online, "redis_type", None)  # an enum in Feast's config: its value
    return {
        "project": store.project,
        # `type` is "redis" for Feast's Redis store; `redis_type` is redis, redis_cluster or redis_sentinel.
        "online_store": {"type": getattr(online, "type", None), "redis_type": getattr(redis_type, "value", redis_type)},
        "entity_key_serialization_version": store.config.entity_key_serialization_version,
        "entities": [
            {"name": e.name, "join_key": e.join_key, "value_type": e.value_type.name} for e in entities.values()
        ],
        "feature_views": [
            {
                "name": view.name,
                "entities": [entities[name].name for name in view.entities if name in entities],
                "ttl_seconds": view.ttl.total_seconds() if view.ttl else 0,
                "features": [{"name": f.name, "type": str(f.dtype)} for f in view.features],
                "online": view.online,
                "materialized": bool(view.materialization_intervals),
            }
            for view in store.list_feature_views()
        ],
        "feature_services": [
            {
                "name": service.name,
                "features": [
                    f"{p.name_to_use()}:{f.name}" for p in service.feature_view_projections for f in p.features
                ],
            }
            for service in store.list_feature_services()
        ],
    }


if __name__ == "__main__":
    json.dump(describe(sys.argv[1]), sys.stdout)
