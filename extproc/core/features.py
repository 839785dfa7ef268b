"""Features for one entity: the store protocol, the embedded store, and the TTL cache.

Every store call runs under the store's time budget; a timeout or refusal is
`FeatureStoreUnavailable`, which the processor turns into 503 (fail-closed) or a
degraded forward (fail-open) per model.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import orjson
from cachetools import TTLCache

from extproc.errors import FeatureStoreUnavailable
from extproc.metrics import CACHE_HIT, CACHE_MISS

Features = dict[str, Any]


class FeatureStore(Protocol):
    async def fetch(self, key: str, names: tuple[str, ...]) -> Features | None:
        """The named features of one entity in one round trip; None when the entity is unknown."""
        ...

    async def fetch_many(self, keys: Sequence[str], names: tuple[str, ...]) -> list[Features | None]:
        """Several entities' features (a batch request's rows) in one round trip, in `keys` order."""
        ...

    async def close(self) -> None: ...


def decode_value(raw: bytes) -> Any:
    """Store values are JSON scalars when they parse as JSON (`52000`, `true`), else strings."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", errors="replace")


def pick(row: Mapping[str, Any] | None, names: tuple[str, ...]) -> Features | None:
    """An entity with none of the requested features counts as unknown."""
    if row is None:
        return None
    found = {name: row.get(name) for name in names}
    return found if any(v is not None for v in found.values()) or not names else None


class EmbeddedFeatureStore:
    """The no-dependency default: a JSON file of `{store key: {feature: value}}` held in memory."""

    def __init__(self, rows: Mapping[str, Mapping[str, Any]]) -> None:
        self._rows = rows

    @classmethod
    def from_file(cls, path: str | Path) -> EmbeddedFeatureStore:
        # orjson, as on the hot path: what loads here is what the broker can send on.
        rows = orjson.loads(Path(path).read_bytes())
        if not isinstance(rows, dict) or not all(isinstance(v, dict) for v in rows.values()):
            raise ValueError(f"{path}: expected a JSON object of objects")
        return cls(rows)

    @property
    def rows(self) -> Mapping[str, Mapping[str, Any]]:
        """Every stored row: `up` takes the keys of its example requests from here."""
        return self._rows

    async def fetch(self, key: str, names: tuple[str, ...]) -> Features | None:
        return pick(self._rows.get(key), names)

    async def fetch_many(self, keys: Sequence[str], names: tuple[str, ...]) -> list[Features | None]:
        return [pick(self._rows.get(key), names) for key in keys]

    async def close(self) -> None:
        return None


class CachedFeatureStore:
    """A TTL cache and a time budget in front of any store.

    Unknown entities are cached too, so a flood of bad keys does not become a
    flood of store calls. Failures are never cached: recovery is immediate.
    """

    def __init__(self, store: FeatureStore, *, ttl_seconds: float, max_entries: int, timeout_s: float) -> None:
        self._store = store
        self._timeout_s = timeout_s
        self._cache: TTLCache[tuple[str, tuple[str, ...]], Features | None] | None = (
            TTLCache(maxsize=max_entries, ttl=ttl_seconds) if ttl_seconds > 0 else None
        )

    async def fetch(self, key: str, names: tuple[str, ...]) -> Features | None:
        cache_key = (key, names)
        if self._cache is not None:
            try:
                found = self._cache[cache_key]
            except KeyError:
                CACHE_MISS.inc()
            else:
                CACHE_HIT.inc()
                return found
        try:
            # Fail policy is the caller's (per model); here a slow store is simply unavailable.
            async with asyncio.timeout(self._timeout_s):
                found = await self._store.fetch(key, names)
        except TimeoutError:
            raise FeatureStoreUnavailable(f"no answer within {self._timeout_s * 1000:.0f} ms") from None
        if self._cache is not None:
            self._cache[cache_key] = found
        return found

    async def fetch_many(self, keys: Sequence[str], names: tuple[str, ...]) -> list[Features | None]:
        """Cached rows from the cache; the others from the store in one call, under one time budget."""
        found: dict[str, Features | None] = {}
        missing = []
        for key in dict.fromkeys(keys):
            try:
                if self._cache is None:
                    raise KeyError(key)
                found[key] = self._cache[(key, names)]
            except KeyError:
                CACHE_MISS.inc()
                missing.append(key)
            else:
                CACHE_HIT.inc()
        if missing:
            try:
                async with asyncio.timeout(self._timeout_s):
                    rows = await self._store.fetch_many(missing, names)
            except TimeoutError:
                raise FeatureStoreUnavailable(f"no answer within {self._timeout_s * 1000:.0f} ms") from None
            for key, row in zip(missing, rows, strict=True):
                found[key] = row
                if self._cache is not None:
                    self._cache[(key, names)] = row
        return [found[key] for key in keys]

    async def close(self) -> None:
        await self._store.close()
