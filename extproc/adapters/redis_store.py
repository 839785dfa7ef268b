"""Redis as the feature store: one hash per entity, one HMGET per request (pipelined for a batch's rows)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError
from redis.retry import Retry

from extproc.core.features import Features, decode_value
from extproc.errors import FeatureStoreUnavailable


def _row(names: tuple[str, ...], values: list[bytes | str | None]) -> Features | None:
    """An HMGET reply as features; an entity with none of them is unknown."""
    if all(v is None for v in values):
        return None
    return {
        name: None if raw is None else decode_value(raw if isinstance(raw, bytes) else raw.encode())
        for name, raw in zip(names, values, strict=True)
    }


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


class RedisFeatureStore:
    def __init__(self, url: str, timeout_s: float) -> None:
        # One immediate retry: after a Redis restart every pooled connection is stale
        # and its first use fails; a second attempt on a fresh connection succeeds.
        # Anything more is left to the caller's time budget (a clear 503, not a slow one).
        self._redis = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), retries=1),
        )

    async def fetch(self, key: str, names: tuple[str, ...]) -> Features | None:
        try:
            if not names:
                return {} if await self._redis.exists(key) else None
            values = await self._redis.hmget(key, list(names))
        except (RedisError, OSError) as exc:
            raise FeatureStoreUnavailable(f"redis: {exc}") from None
        return _row(names, values)

    async def fetch_many(self, keys: Sequence[str], names: tuple[str, ...]) -> list[Features | None]:
        """One pipelined round trip: an HMGET (or EXISTS, without names) per key."""
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    if names:
                        pipe.hmget(key, list(names))
                    else:
                        pipe.exists(key)
                replies = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise FeatureStoreUnavailable(f"redis: {exc}") from None
        if not names:
            return [{} if exists else None for exists in replies]
        return [_row(names, values) for values in replies]

    async def sample_rows(self, match: str, limit: int = 20) -> dict[str, dict[str, None]]:
        """Up to `limit` hashes whose key matches a glob, with their field names (values left out).

        For `up`'s example requests, never the hot path: a few SCAN pages, not an inventory;
        Redis away or slow gives what was found so far (the example then asks for a key).
        """
        rows: dict[str, dict[str, None]] = {}
        cursor = 0
        try:
            for _ in range(10):
                cursor, keys = await self._redis.scan(cursor, match=match, count=1000)
                for key in keys[: limit - len(rows)]:
                    with contextlib.suppress(ResponseError):  # not a hash: not a feature row
                        fields = await self._redis.hkeys(key)
                        rows[_text(key)] = dict.fromkeys(_text(f) for f in fields)
                if cursor == 0 or len(rows) >= limit:
                    break
        except (RedisError, OSError):
            pass
        return rows

    async def close(self) -> None:
        await self._redis.aclose()
