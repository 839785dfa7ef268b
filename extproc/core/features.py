"""Features for entities: the store protocol, the embedded store, and the TTL cache.

Every store call runs under the store's time budget; a timeout or refusal is
`FeatureStoreUnavailable`, which the processor turns into 503 (fail-closed) or a
degraded forward (fail-open) per model. One call serves every row of a request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson
from cachetools import TTLCache

from extproc.errors import FeatureStoreUnavailable
from extproc.metrics import CACHE_HIT, CACHE_MISS

log = logging.getLogger("model_broker.features")

Features = dict[str, Any]
# What a store looks one entity up by: the own layout's hash key, Feast's (join key, value) pairs.
EntityKey = Hashable

# A store failing and answering by turns is reported down at most this often.
OUTAGE_REPORT_SECONDS = 10.0

# A requested feature the store did not give: never written (or expired), or older than its view's TTL.
MISSING = "missing"
STALE = "stale"


@dataclass(frozen=True, slots=True)
class FeatureRow:
    """One entity's features: every requested name (None where absent), and why each absent one is."""

    values: Features
    # Only the names that are not present; empty when the row is complete.
    absent: Mapping[str, str] = field(default_factory=dict)
    # When (time.time()) a present value passes its max age (a Feast view's TTL, from `_ts`):
    # the cache drops the row then, so a cached value is never served stale. inf: never.
    fresh_until: float = math.inf
    # `values` under other names, built once per cached row (`renamed`): not part of the row's value.
    _renamed: dict[tuple[tuple[str, ...], tuple[str, ...]], Features] = field(
        default_factory=dict, compare=False, repr=False
    )

    def renamed(self, refs: tuple[str, ...], names: tuple[str, ...]) -> Features:
        """`values` with each of `refs` under the name at its position in `names` (Feast's short names).

        Built once per row: a cached row serves every hit the same dict, as an unrenamed row
        serves its `values` (nothing downstream changes a settled feature dict; it is copied first).
        """
        key = (refs, names)
        found = self._renamed.get(key)
        if found is None:
            values = self.values
            found = self._renamed[key] = {new: values[old] for old, new in zip(refs, names, strict=True)}
        return found


class FeatureStore(Protocol):
    async def fetch_rows(self, keys: Sequence[EntityKey], names: tuple[str, ...]) -> list[FeatureRow | None]:
        """The named features of each entity in one round trip; None for an entity the store does not know."""
        ...

    async def close(self) -> None: ...


def decode_value(raw: bytes) -> Any:
    """Store values are JSON scalars when they parse as JSON (`52000`, `true`), else strings."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", errors="replace")


def pick(row: Mapping[str, Any] | None, names: tuple[str, ...]) -> FeatureRow | None:
    """A stored row cut to `names`; an entity with none of them counts as unknown."""
    if row is None:
        return None
    found = {name: row.get(name) for name in names}
    if names and all(v is None for v in found.values()):
        return None
    return FeatureRow(found, {name: MISSING for name, v in found.items() if v is None})


def narrow(row: FeatureRow | None, names: tuple[str, ...]) -> FeatureRow | None:
    """The part of a fetched row one consumer asked for (an ensemble member of a union fetch)."""
    if row is None:
        return None
    values = {name: row.values.get(name) for name in names}
    absent = {name: row.absent[name] for name in names if name in row.absent}
    if names and len(absent) == len(names):
        return None
    return FeatureRow(values, absent)


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

    async def fetch_rows(self, keys: Sequence[EntityKey], names: tuple[str, ...]) -> list[FeatureRow | None]:
        return [pick(self._rows.get(key) if isinstance(key, str) else None, names) for key in keys]

    async def close(self) -> None:
        return None


class CachedFeatureStore:
    """A TTL cache and a time budget in front of any store.

    Unknown entities are cached too, so a flood of bad keys does not become a
    flood of store calls. Failures are never cached: recovery is immediate. A row
    is served until the TTL or its `fresh_until`, whichever comes first: max age is
    judged from `_ts` when the row is read, and a cached row is never served past it.
    The store's state is logged once per transition (down with its cause, back up),
    at most one outage per OUTAGE_REPORT_SECONDS.
    """

    def __init__(self, store: FeatureStore, *, ttl_seconds: float, max_entries: int, timeout_s: float) -> None:
        self._store = store
        self._timeout_s = timeout_s
        self._cache: TTLCache[tuple[EntityKey, tuple[str, ...]], FeatureRow | None] | None = (
            TTLCache(maxsize=max_entries, ttl=ttl_seconds) if ttl_seconds > 0 else None
        )
        # Whether the last report said "unavailable" (the next success then says "reachable again").
        self._reported_down = False
        self._last_report = -OUTAGE_REPORT_SECONDS

    async def fetch_rows(self, keys: Sequence[EntityKey], names: tuple[str, ...]) -> list[FeatureRow | None]:
        """Cached rows from the cache; the others (each key once) from the store in one call, one time budget."""
        found: dict[EntityKey, FeatureRow | None] = {}
        wanted: list[EntityKey] = []
        now = time.time()
        for key in dict.fromkeys(keys):
            try:
                if self._cache is None:
                    raise KeyError(key)
                row = self._cache[(key, names)]
                if row is not None and row.fresh_until <= now:
                    raise KeyError(key)  # a value in it has passed its max age since it was read: read again
                found[key] = row
            except KeyError:
                CACHE_MISS.inc()
                wanted.append(key)
            else:
                CACHE_HIT.inc()
        if wanted:
            for key, row in zip(wanted, await self._fetch(wanted, names), strict=True):
                found[key] = row
                if self._cache is not None:
                    self._cache[(key, names)] = row
        return [found[key] for key in keys]

    async def _fetch(self, keys: list[EntityKey], names: tuple[str, ...]) -> list[FeatureRow | None]:
        try:
            # Fail policy is the caller's (per model); here a slow store is simply unavailable.
            async with asyncio.timeout(self._timeout_s):
                rows = await self._store.fetch_rows(keys, names)
        except TimeoutError:
            self._went_down(f"no answer within {self._timeout_s * 1000:.0f} ms")
            raise FeatureStoreUnavailable(f"no answer within {self._timeout_s * 1000:.0f} ms") from None
        except FeatureStoreUnavailable as exc:
            self._went_down(str(exc))
            raise
        if self._reported_down:
            self._reported_down = False
            log.warning("feature store reachable again")
        return rows

    def _went_down(self, cause: str) -> None:
        # At most one report per OUTAGE_REPORT_SECONDS: a store that is down for some keys
        # only (a Redis Cluster missing a shard) fails and answers by turns, and one line
        # per turn would flood the log at the request rate.
        now = time.monotonic()
        if not self._reported_down and now - self._last_report >= OUTAGE_REPORT_SECONDS:
            self._reported_down = True
            self._last_report = now
            log.error("feature store unavailable: %s", cause)

    async def close(self) -> None:
        await self._store.close()
