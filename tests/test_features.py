"""The feature store: embedded file, real Redis, and the TTL cache with its time budget."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from extproc.adapters.redis_store import RedisFeatureStore
from extproc.core.features import CachedFeatureStore, EmbeddedFeatureStore, Features, decode_value
from extproc.errors import FeatureStoreUnavailable
from tests.conftest import DEMO_DIR, RedisServer


@pytest.mark.parametrize(
    ("raw", "value"),
    [(b"52000", 52000), (b"0.25", 0.25), (b"true", True), (b"retail", "retail"), (b'"quoted"', "quoted")],
    ids=["int", "float", "bool", "bare-string", "json-string"],
)
def test_decode_value(raw: bytes, value: Any) -> None:
    """Store values keep their JSON type when they have one."""
    assert decode_value(raw) == value


async def test_embedded_store_reads_the_demo_file() -> None:
    """The demo file has customers c-1 … c-100 with the demo features."""
    store = EmbeddedFeatureStore.from_file(DEMO_DIR / "features.json")
    found = await store.fetch("customer:c-100", ("income", "debt_ratio"))
    assert found is not None and set(found) == {"income", "debt_ratio"}
    assert await store.fetch("customer:c-101", ("income",)) is None


async def test_redis_store_fetches_typed_values(redis_server: RedisServer) -> None:
    """One HMGET returns the requested features, decoded; absent fields are null."""
    redis_server.cli("HSET", "customer:t-1", "income", "41000", "segment", "retail")
    store = RedisFeatureStore(redis_server.url, timeout_s=1.0)
    try:
        assert await store.fetch("customer:t-1", ("income", "segment", "nope")) == {
            "income": 41000,
            "segment": "retail",
            "nope": None,
        }
        assert await store.fetch("customer:t-unknown", ("income",)) is None
    finally:
        await store.close()


async def test_redis_store_fetches_a_batch_in_one_pipeline(redis_server: RedisServer) -> None:
    """A batch's rows come back in key order, an unknown entity as None, typed as single fetches are."""
    redis_server.cli("HSET", "customer:b-1", "income", "41000", "segment", "retail")
    redis_server.cli("HSET", "customer:b-2", "income", "52000.5")
    store = RedisFeatureStore(redis_server.url, timeout_s=1.0)
    try:
        rows = await store.fetch_many(["customer:b-2", "customer:nobody", "customer:b-1"], ("income", "segment"))
        assert rows == [
            {"income": 52000.5, "segment": None},
            None,
            {"income": 41000, "segment": "retail"},
        ]
        assert await store.fetch_many(["customer:b-1", "customer:nobody"], ()) == [{}, None]
    finally:
        await store.close()


async def test_cached_batch_asks_the_store_once_for_the_misses() -> None:
    """Cached rows are served from the cache; the rest in one store call, then cached too."""
    inner = CountingStore()
    inner.rows["j"] = {"a": 2}
    cached = CachedFeatureStore(inner, ttl_seconds=60, max_entries=10, timeout_s=1.0)
    assert await cached.fetch("k", ("a",)) == {"a": 1}
    assert await cached.fetch_many(["j", "k", "x", "j"], ("a",)) == [{"a": 2}, {"a": 1}, None, {"a": 2}]
    assert inner.batches == [["j", "x"]]
    assert await cached.fetch_many(["x", "j"], ("a",)) == [None, {"a": 2}]
    assert inner.batches == [["j", "x"]]


async def test_redis_down_is_feature_store_unavailable() -> None:
    """A refused connection is translated at the adapter edge, not leaked as a redis error."""
    store = RedisFeatureStore("redis://127.0.0.1:1/0", timeout_s=0.5)
    try:
        with pytest.raises(FeatureStoreUnavailable):
            await store.fetch("customer:c-1", ("income",))
    finally:
        await store.close()


class CountingStore:
    """A real in-memory store that counts calls and can be made slow or broken."""

    def __init__(self) -> None:
        self.rows: dict[str, Features] = {"k": {"a": 1}}
        self.calls = 0
        self.delay = 0.0
        self.broken = False
        self.batches: list[list[str]] = []

    async def fetch(self, key: str, names: tuple[str, ...]) -> Features | None:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.broken:
            raise FeatureStoreUnavailable("broken")
        row = self.rows.get(key)
        return None if row is None else {n: row.get(n) for n in names}

    async def fetch_many(self, keys: Sequence[str], names: tuple[str, ...]) -> list[Features | None]:
        self.batches.append(list(keys))
        return [None if (row := self.rows.get(k)) is None else {n: row.get(n) for n in names} for k in keys]

    async def close(self) -> None:
        return None


async def test_cache_serves_repeats_and_unknowns_until_ttl() -> None:
    """Repeats and unknown entities hit the store once per TTL."""
    inner = CountingStore()
    cached = CachedFeatureStore(inner, ttl_seconds=0.2, max_entries=10, timeout_s=1.0)
    for _ in range(3):
        assert await cached.fetch("k", ("a",)) == {"a": 1}
        assert await cached.fetch("missing", ("a",)) is None
    assert inner.calls == 2
    await asyncio.sleep(0.25)
    await cached.fetch("k", ("a",))
    assert inner.calls == 3


async def test_failures_are_not_cached() -> None:
    """After an outage the next request goes to the store again: recovery without restart."""
    inner = CountingStore()
    inner.broken = True
    cached = CachedFeatureStore(inner, ttl_seconds=60, max_entries=10, timeout_s=1.0)
    with pytest.raises(FeatureStoreUnavailable):
        await cached.fetch("k", ("a",))
    inner.broken = False
    assert await cached.fetch("k", ("a",)) == {"a": 1}


async def test_slow_store_times_out_within_budget() -> None:
    """A store slower than the budget is unavailable after the budget, not after the store."""
    inner = CountingStore()
    inner.delay = 5.0
    cached = CachedFeatureStore(inner, ttl_seconds=0, max_entries=10, timeout_s=0.05)
    started = asyncio.get_running_loop().time()
    with pytest.raises(FeatureStoreUnavailable, match="50 ms"):
        await cached.fetch("k", ("a",))
    assert asyncio.get_running_loop().time() - started < 1.0


async def test_embedded_store_values_survive_reserialisation(tmp_path: Path) -> None:
    """An integer too large for JSON serialisation loads as a number the broker can still send."""
    path = tmp_path / "features.json"
    path.write_text('{"customer:x": {"big": 123456789012345678901234567890}}')
    found = await EmbeddedFeatureStore.from_file(path).fetch("customer:x", ("big",))
    assert found is not None
    assert orjson.loads(orjson.dumps(found))["big"] == pytest.approx(1.2345678901234568e29)
