"""Redis as the feature store: one hash per entity, one pipelined HMGET per request."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError
from redis.retry import Retry

from extproc.core.features import EntityKey, FeatureRow, decode_value, pick
from extproc.errors import FeatureStoreUnavailable


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def connect(url: str, timeout_s: float) -> Redis:
    """A client whose failures are quick: the caller's time budget decides, not Redis's retries."""
    # One immediate retry: after a Redis restart every pooled connection is stale
    # and its first use fails; a second attempt on a fresh connection succeeds.
    # Anything more is left to the caller's time budget (a clear 503, not a slow one).
    return Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), retries=1),
    )


class RedisFeatureStore:
    def __init__(self, url: str, timeout_s: float) -> None:
        self._redis = connect(url, timeout_s)

    async def fetch_rows(self, keys: Sequence[EntityKey], names: tuple[str, ...]) -> list[FeatureRow | None]:
        try:
            if not names:
                pipe = self._redis.pipeline(transaction=False)
                for key in keys:
                    pipe.exists(str(key))
                return [FeatureRow({}) if n else None for n in await pipe.execute()]
            if len(keys) == 1:  # the common case: no pipeline object to build
                replies = [await self._redis.hmget(str(keys[0]), list(names))]
            else:
                pipe = self._redis.pipeline(transaction=False)
                for key in keys:
                    pipe.hmget(str(key), list(names))
                replies = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise FeatureStoreUnavailable(f"redis: {exc}") from None
        return [pick(_decoded(names, values), names) for values in replies]

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


def _decoded(names: tuple[str, ...], values: list[bytes | str | None]) -> dict[str, object] | None:
    if all(v is None for v in values):
        return None
    return {
        name: None if raw is None else decode_value(raw if isinstance(raw, bytes) else raw.encode())
        for name, raw in zip(names, values, strict=True)
    }
