"""The feature store: embedded file, real Redis, and the TTL cache with its time budget."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from extproc.adapters.redis_store import RedisFeatureStore
from extproc.core.features import (
    CachedFeatureStore,
    EmbeddedFeatureStore,
    EntityKey,
    FeatureRow,
    Features,
    FeatureStore,
    decode_value,
    pick,
)
from extproc.errors import FeatureStoreUnavailable
from tests.conftest import DEMO_DIR, RedisServer


async def one(store: FeatureStore, key: str, names: tuple[str, ...]) -> Features | None:
    """One entity's values (None when unknown): what most tests here look at."""
    row = (await store.fetch_rows([key], names))[0]
    return None if row is None else row.values


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
    found = await one(store, "customer:c-100", ("income", "debt_ratio"))
    assert found is not None and set(found) == {"income", "debt_ratio"}
    assert await one(store, "customer:c-101", ("income",)) is None


async def test_redis_store_fetches_typed_values(redis_server: RedisServer) -> None:
    """One HMGET per entity returns the requested features, decoded; absent fields are null and marked missing."""
    redis_server.cli("HSET", "customer:t-1", "income", "41000", "segment", "retail")
    redis_server.cli("HSET", "customer:t-2", "income", "7")
    store = RedisFeatureStore(redis_server.url, timeout_s=1.0)
    try:
        rows = await store.fetch_rows(["customer:t-1", "customer:t-unknown", "customer:t-2"], ("income", "segment"))
        assert rows == [
            FeatureRow({"income": 41000, "segment": "retail"}),
            None,
            FeatureRow({"income": 7, "segment": None}, {"segment": "missing"}),
        ]
        # Without names, a batch asks only whether each entity exists.
        assert await store.fetch_rows(["customer:t-2", "customer:nobody"], ()) == [FeatureRow({}), None]
    finally:
        await store.close()


async def test_redis_down_is_feature_store_unavailable() -> None:
    """A refused connection is translated at the adapter edge, not leaked as a redis error."""
    store = RedisFeatureStore("redis://127.0.0.1:1/0", timeout_s=0.5)
    try:
        with pytest.raises(FeatureStoreUnavailable):
            await one(store, "customer:c-1", ("income",))
    finally:
        await store.close()


class CountingStore:
    """A real in-memory store that counts calls and can be made slow or broken."""

    def __init__(self) -> None:
        self.rows: dict[str, Features] = {"k": {"a": 1}, "j": {"a": 2}}
        self.calls = 0
        self.keys: list[list[EntityKey]] = []
        self.delay = 0.0
        self.broken = False

    async def fetch_rows(self, keys: Sequence[EntityKey], names: tuple[str, ...]) -> list[FeatureRow | None]:
        self.calls += 1
        self.keys.append(list(keys))
        await asyncio.sleep(self.delay)
        if self.broken:
            raise FeatureStoreUnavailable("broken")
        return [pick(self.rows.get(str(key)), names) for key in keys]

    async def close(self) -> None:
        return None


async def test_cache_serves_repeats_and_unknowns_until_ttl() -> None:
    """Repeats and unknown entities hit the store once per TTL."""
    inner = CountingStore()
    cached = CachedFeatureStore(inner, ttl_seconds=0.2, max_entries=10, timeout_s=1.0)
    for _ in range(3):
        assert await one(cached, "k", ("a",)) == {"a": 1}
        assert await one(cached, "missing", ("a",)) is None
    assert inner.calls == 2
    await asyncio.sleep(0.25)
    await one(cached, "k", ("a",))
    assert inner.calls == 3


class AgingStore(CountingStore):
    """Rows whose values pass their max age `max_age_s` after each read (as a Feast view's TTL does)."""

    max_age_s = 0.2

    async def fetch_rows(self, keys: Sequence[EntityKey], names: tuple[str, ...]) -> list[FeatureRow | None]:
        rows = await super().fetch_rows(keys, names)
        until = time.time() + self.max_age_s
        return [None if row is None else FeatureRow(row.values, row.absent, until) for row in rows]


async def test_cache_drops_a_row_once_a_value_passes_its_max_age() -> None:
    """A cache TTL longer than a value's remaining max age does not serve it past that age: it is read again."""
    inner = AgingStore()
    cached = CachedFeatureStore(inner, ttl_seconds=60, max_entries=10, timeout_s=1.0)
    for _ in range(3):
        assert await one(cached, "k", ("a",)) == {"a": 1}
    assert inner.calls == 1
    await asyncio.sleep(0.25)
    assert await one(cached, "k", ("a",)) == {"a": 1}
    assert inner.calls == 2


def test_renamed_values_are_built_once_per_row() -> None:
    """A cached row renamed for a route (Feast's short names) gives every hit the same dict, right per name list."""
    row = FeatureRow({"v:a": 1, "v:b": 2})
    short = row.renamed(("v:a", "v:b"), ("a", "b"))
    assert short == {"a": 1, "b": 2}
    assert row.renamed(("v:a", "v:b"), ("a", "b")) is short
    assert row.renamed(("v:a", "v:b"), ("v__a", "v__b")) == {"v__a": 1, "v__b": 2}
    assert row == FeatureRow({"v:a": 1, "v:b": 2})  # the memo is not part of the row's value


async def test_failures_are_not_cached() -> None:
    """After an outage the next request goes to the store again: recovery without restart."""
    inner = CountingStore()
    inner.broken = True
    cached = CachedFeatureStore(inner, ttl_seconds=60, max_entries=10, timeout_s=1.0)
    with pytest.raises(FeatureStoreUnavailable):
        await one(cached, "k", ("a",))
    inner.broken = False
    assert await one(cached, "k", ("a",)) == {"a": 1}


async def test_slow_store_times_out_within_budget() -> None:
    """A store slower than the budget is unavailable after the budget, not after the store."""
    inner = CountingStore()
    inner.delay = 5.0
    cached = CachedFeatureStore(inner, ttl_seconds=0, max_entries=10, timeout_s=0.05)
    started = asyncio.get_running_loop().time()
    with pytest.raises(FeatureStoreUnavailable, match="50 ms"):
        await one(cached, "k", ("a",))
    assert asyncio.get_running_loop().time() - started < 1.0


async def test_embedded_store_values_survive_reserialisation(tmp_path: Path) -> None:
    """An integer too large for JSON serialisation loads as a number the broker can still send."""
    path = tmp_path / "features.json"
    path.write_text('{"customer:x": {"big": 123456789012345678901234567890}}')
    found = await one(EmbeddedFeatureStore.from_file(path), "customer:x", ("big",))
    assert found is not None
    assert orjson.loads(orjson.dumps(found))["big"] == pytest.approx(1.2345678901234568e29)


async def test_batch_fetches_only_the_misses_in_one_call() -> None:
    """Rows already cached are served from the cache; the rest (each key once) go to the store together."""
    inner = CountingStore()
    cached = CachedFeatureStore(inner, ttl_seconds=60, max_entries=10, timeout_s=1.0)
    await one(cached, "k", ("a",))
    rows = await cached.fetch_rows(["k", "j", "nope", "j"], ("a",))
    assert rows == [FeatureRow({"a": 1}), FeatureRow({"a": 2}), None, FeatureRow({"a": 2})]
    assert inner.keys == [["k"], ["j", "nope"]]
    assert await cached.fetch_rows(["nope", "j"], ("a",)) == [None, FeatureRow({"a": 2})]
    assert inner.keys == [["k"], ["j", "nope"]]


async def test_outage_logged_once_per_transition(caplog: pytest.LogCaptureFixture) -> None:
    """Down: one error line with the cause, however many requests fail; back: one line."""
    inner = CountingStore()
    inner.broken = True
    cached = CachedFeatureStore(inner, ttl_seconds=0, max_entries=10, timeout_s=1.0)
    with caplog.at_level(logging.INFO, logger="model_broker.features"):
        for _ in range(3):
            with pytest.raises(FeatureStoreUnavailable):
                await one(cached, "k", ("a",))
        inner.broken = False
        for _ in range(2):
            await one(cached, "k", ("a",))
    assert [r.getMessage() for r in caplog.records] == [
        "feature store unavailable: broken",
        "feature store reachable again",
    ]


async def test_a_flapping_store_is_reported_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    """Failing and answering by turns (a cluster missing a shard): one outage report, not one per turn."""
    inner = CountingStore()
    cached = CachedFeatureStore(inner, ttl_seconds=0, max_entries=10, timeout_s=1.0)
    with caplog.at_level(logging.INFO, logger="model_broker.features"):
        for _ in range(5):
            inner.broken = True
            with pytest.raises(FeatureStoreUnavailable):
                await one(cached, "k", ("a",))
            inner.broken = False
            await one(cached, "k", ("a",))
    assert [r.getMessage() for r in caplog.records] == [
        "feature store unavailable: broken",
        "feature store reachable again",
    ]
