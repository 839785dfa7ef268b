"""Redis as the feature store: one hash per entity, one pipelined HMGET per request.

Also the one place a Redis client is made (`connect`), for one Redis or a Redis
Cluster; the Feast adapter borrows it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError, ResponseError
from redis.retry import Retry

from extproc.core.features import EntityKey, FeatureRow, decode_value, pick
from extproc.errors import FeatureStoreUnavailable


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


# What a Redis call can fail with: the server's errors, the socket's, and redis-py's
# cluster errors that are not RedisErrors (no reachable node, a slot nobody serves).
REDIS_FAILURES = (RedisError, RedisClusterException, OSError)
# Retries of a cluster command or pipeline on a moved slot, a lost connection or a
# cluster that is down (redis-py's ERRORS_ALLOW_RETRY); each re-reads the slot map
# (and redis-py waits 0.25 s before a pipeline's). MOVED/ASK redirects are followed
# per command on top of these. The caller's time budget bounds them all.
CLUSTER_RETRIES = 2
# Whole reads the adapter makes on a cluster, and the pause before each retry (see
# `read_replies`): when one pipeline fails redis-py closes every connection of the
# client, so the retry waits for that to pass rather than meet it again.
CLUSTER_ATTEMPTS = 3
CLUSTER_RETRY_PAUSE_S = 0.02
# Connections per cluster node per worker: one per request in flight at most (the
# worker admits up to broker.max_streams); redis-py's default of 100 would fail the rest.
CLUSTER_MAX_CONNECTIONS = 1024


def connect(url: str, timeout_s: float, *, cluster: bool = False) -> Redis | RedisCluster:
    """A client whose failures are quick: the caller's time budget decides, not Redis's retries.

    `cluster`: a Redis Cluster discovered from the node in `url`; its pipelines are
    split per node by redis-py and sent to all nodes at once.
    """
    if cluster:
        # Reads go to each slot's master only (no read_from_replicas): a replica may
        # lag, and a value it has not received yet would read as a missing feature.
        return RedisCluster.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), retries=CLUSTER_RETRIES),
            max_connections=CLUSTER_MAX_CONNECTIONS,
        )
    # One immediate retry: after a Redis restart every pooled connection is stale
    # and its first use fails; a second attempt on a fresh connection succeeds.
    # Anything more is left to the caller's time budget (a clear 503, not a slow one).
    return Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), retries=1),
    )


async def read_replies(
    read: Callable[[], Awaitable[list[Any]]], *, attempts: int, widths: Sequence[int] | None = None
) -> list[Any]:
    """`read()`'s replies once they are whole, trying at most `attempts` times; else FeatureStoreUnavailable.

    Whole: no reply is an error, and with `widths` each is an HMGET answer of that many
    fields. Anything else is the store failing, never an entity without features: a
    reply lost in a failover must not reach a model as a missing feature.
    """
    cause = ""
    for attempt in range(attempts):
        if attempt:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # The caller's time budget ran out and the client turned the cancellation
                # into an error: stop here, the budget's own TimeoutError is the answer.
                raise asyncio.CancelledError
            await asyncio.sleep(CLUSTER_RETRY_PAUSE_S)
        try:
            replies = await read()
        except REDIS_FAILURES as exc:
            cause = str(exc)
            continue
        except (RuntimeError, AttributeError) as exc:
            # redis-py's cluster client, re-initialising after a topology change, can close
            # a connection under a concurrent command; that surfaces as these, not a RedisError.
            cause = f"{type(exc).__name__}: {exc}"
            continue
        bad = _malformed(replies, widths)
        if bad is None:
            return replies
        cause = bad
    raise FeatureStoreUnavailable(f"redis: {cause}")


def _malformed(replies: list[Any], widths: Sequence[int] | None) -> str | None:
    if widths is not None and len(replies) != len(widths):
        return f"{len(replies)} replies to {len(widths)} commands"
    for i, reply in enumerate(replies):
        if isinstance(reply, Exception):
            return str(reply)
        if widths is not None and not (isinstance(reply, list) and len(reply) == widths[i]):
            return f"reply {i} is not an answer to HMGET of {widths[i]} fields: {reply!r:.80}"
    return None


class RedisFeatureStore:
    def __init__(self, url: str, timeout_s: float, *, cluster: bool = False) -> None:
        self._redis = connect(url, timeout_s, cluster=cluster)
        # One Redis: its client's own immediate retry is enough. A cluster: one more whole
        # attempt on top of redis-py's, for the errors its re-initialisation can leak.
        self._attempts = CLUSTER_ATTEMPTS if cluster else 1

    async def fetch_rows(self, keys: Sequence[EntityKey], names: tuple[str, ...]) -> list[FeatureRow | None]:
        if not names:
            return [
                FeatureRow({}) if n else None for n in await read_replies(self._exists(keys), attempts=self._attempts)
            ]
        fields = list(names)
        replies = await read_replies(
            self._hmgets(keys, fields), attempts=self._attempts, widths=[len(fields)] * len(keys)
        )
        return [pick(_decoded(names, values), names) for values in replies]

    def _exists(self, keys: Sequence[EntityKey]) -> Callable[[], Awaitable[list[Any]]]:
        async def read() -> list[Any]:
            pipe = self._redis.pipeline(transaction=False)
            for key in keys:
                pipe.exists(str(key))
            return await pipe.execute()

        return read

    def _hmgets(self, keys: Sequence[EntityKey], fields: list[str]) -> Callable[[], Awaitable[list[Any]]]:
        async def read() -> list[Any]:
            if len(keys) == 1:  # the common case: no pipeline object to build
                return [await self._redis.hmget(str(keys[0]), fields)]
            pipe = self._redis.pipeline(transaction=False)
            for key in keys:
                pipe.hmget(str(key), fields)
            return await pipe.execute()

        return read

    async def sample_rows(self, match: str, limit: int = 20) -> dict[str, dict[str, None]]:
        """Up to `limit` hashes whose key matches a glob, with their field names (values left out).

        For `up`'s example requests, never the hot path: a few SCAN pages, not an inventory;
        Redis away or slow gives what was found so far (the example then asks for a key).
        """
        rows: dict[str, dict[str, None]] = {}
        cursor = 0
        try:
            if isinstance(self._redis, RedisCluster):
                # Every master's keyspace in turn; the caller's timeout bounds the walk.
                async for key in self._redis.scan_iter(match=match, count=1000, _type="hash"):
                    rows[_text(key)] = dict.fromkeys(_text(f) for f in await self._redis.hkeys(key))
                    if len(rows) >= limit:
                        break
                return rows
            for _ in range(10):
                cursor, keys = await self._redis.scan(cursor, match=match, count=1000)
                for key in keys[: limit - len(rows)]:
                    with contextlib.suppress(ResponseError):  # not a hash: not a feature row
                        fields = await self._redis.hkeys(key)
                        rows[_text(key)] = dict.fromkeys(_text(f) for f in fields)
                if cursor == 0 or len(rows) >= limit:
                    break
        except REDIS_FAILURES:
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
