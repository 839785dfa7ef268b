"""Feast's Redis online store, read natively: one pipelined round trip per request.

The keys, fields and values are Feast's own (`core/feast_read.py` plans them);
this module only sends the HMGETs and translates Redis failures.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from redis.exceptions import RedisError

from extproc.adapters.redis_store import connect
from extproc.core.feast_read import FeastKey, FeastView, ReadPlan
from extproc.core.features import EntityKey, FeatureRow
from extproc.errors import FeatureStoreUnavailable


class FeastFeatureStore:
    def __init__(self, url: str, *, project: str, views: Mapping[str, FeastView], timeout_s: float) -> None:
        self._redis = connect(url, timeout_s)
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
        # transaction=False: a plain pipeline, as Feast's reader sends it (no MULTI/EXEC).
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            assert isinstance(key, tuple)  # routes on a Feast store build FeastKeys
            for redis_key, fields in plan.commands(_feast_key(key)):
                pipe.hmget(redis_key, fields)
        try:
            replies = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise FeatureStoreUnavailable(f"redis: {exc}") from None
        now = time.time()
        per = len(plan.reads)
        return [plan.row(replies[i * per : (i + 1) * per], now) for i in range(len(keys))]

    async def close(self) -> None:
        await self._redis.aclose()


def _feast_key(key: tuple[object, ...]) -> FeastKey:
    return key  # type: ignore[return-value]  # built by core.entity for Feast routes only
