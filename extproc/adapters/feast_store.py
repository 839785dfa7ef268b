"""Feast's Redis online store, read natively: one pipelined round trip per request.

The keys, fields and values are Feast's own (`core/feast_read.py` plans them);
this module only sends the HMGETs and translates Redis failures. On a Redis
Cluster (Feast's `redis_type: redis_cluster`) the keys are the same bytes: Feast
adds no hash tag, and the pipeline goes out as one per node, all at once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from extproc.adapters.redis_store import CLUSTER_ATTEMPTS, connect, read_replies
from extproc.core.feast_read import FeastKey, FeastView, ReadPlan
from extproc.core.features import EntityKey, FeatureRow


class FeastFeatureStore:
    def __init__(
        self, url: str, *, project: str, views: Mapping[str, FeastView], timeout_s: float, cluster: bool = False
    ) -> None:
        self._redis = connect(url, timeout_s, cluster=cluster)
        self._attempts = CLUSTER_ATTEMPTS if cluster else 1
        self._project = project
        self._views = views
        # One plan per feature list: a route's list never changes between registry reloads.
        self._plans: dict[tuple[str, ...], ReadPlan] = {}

    def _plan(self, names: tuple[str, ...]) -> ReadPlan:
        plan = self._plans.get(names)
        if plan is None:
            plan = self._plans[names] = ReadPlan(self._project, self._views, names)
        return plan

    async def fetch_rows(self, keys: Sequence[EntityKey], names: tuple[str, ...]) -> list[FeatureRow | None]:
        plan = self._plan(names)
        commands = []
        for key in keys:
            assert isinstance(key, tuple)  # routes on a Feast store build FeastKeys
            commands.extend(plan.commands(_feast_key(key)))

        async def read() -> list[Any]:
            # transaction=False: a plain pipeline, as Feast's reader sends it (no MULTI/EXEC);
            # on a cluster redis-py groups it by node and sends the groups concurrently.
            if len(commands) == 1:  # one view, one entity (the common case): no pipeline object to build
                redis_key, fields = commands[0]
                return [await self._redis.hmget(redis_key, fields)]
            pipe = self._redis.pipeline(transaction=False)
            for redis_key, fields in commands:
                pipe.hmget(redis_key, fields)
            return await pipe.execute()

        replies = await read_replies(read, attempts=self._attempts, widths=[len(f) for _, f in commands])
        now = time.time()
        per = len(plan.reads)
        return [plan.row(replies[i * per : (i + 1) * per], now) for i in range(len(keys))]

    async def close(self) -> None:
        await self._redis.aclose()


def _feast_key(key: tuple[object, ...]) -> FeastKey:
    return key  # type: ignore[return-value]  # built by core.entity for Feast routes only
