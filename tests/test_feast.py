"""A real Feast repo (feast SDK, its own venv) on a real Redis, read by the broker through a real Envoy.

The test writes the repo, runs `feast apply`, writes rows with Feast's own online
writer, and compares what the model receives with `get_online_features`.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from extproc.process.launcher import free_port
from tests.conftest import ROOT, ClientOptions, RedisServer, Stack, demo_registry_doc, run_stack
from tests.http import Reply, call

NOW = int(time.time())
# Customers 0..59: ids past 2**53 for half of them (int64 keys must survive JSON and Feast's encoding).
CUSTOMERS = [2**53 + 1 + i if i % 2 else i + 1 for i in range(60)]
STALE_CUSTOMER = CUSTOMERS[3]  # its `recent_stats` row is two hours old; the view's ttl is one hour
PARTIAL_CUSTOMER = 4242  # `customer_stats` written without `segment`
OTHER_ONLY = 777  # written to the other project only
STATS = ("txn_count", "avg_amount", "score32", "segment", "vip", "blob", "last_seen", "recent", "tags", "small")
STATS_REFS = [f"customer_stats:{name}" for name in STATS]
# The JSON type a model gets for each Python type `get_online_features` returns (README, "Feast").
JSON_TYPE = {"int": int, "float": float, "str": str, "bool": bool, "bytes": str, "datetime": str, "list": list}

DEFINITIONS = """
from datetime import timedelta
from feast import Entity, FeatureService, FeatureView, Field, FileSource
from feast.types import Array, Bool, Bytes, Float32, Float64, Int32, Int64, String, UnixTimestamp
from feast.value_type import ValueType

customer = Entity(name="customer", join_keys=["customer_id"], value_type=ValueType.INT64)
merchant = Entity(name="merchant", join_keys=["merchant_id"], value_type=ValueType.STRING)

def source(name):
    return FileSource(path=f"data/{name}.parquet", timestamp_field="event_timestamp")

customer_stats = FeatureView(
    name="customer_stats", entities=[customer], ttl=timedelta(days=1), source=source("customer_stats"),
    schema=[
        Field(name="txn_count", dtype=Int64), Field(name="avg_amount", dtype=Float64),
        Field(name="score32", dtype=Float32), Field(name="segment", dtype=String), Field(name="vip", dtype=Bool),
        Field(name="blob", dtype=Bytes), Field(name="last_seen", dtype=UnixTimestamp),
        Field(name="recent", dtype=Array(Int64)), Field(name="tags", dtype=Array(String)),
        Field(name="small", dtype=Int32),
    ],
)
recent_stats = FeatureView(
    name="recent_stats", entities=[customer], ttl=timedelta(hours=1), source=source("recent_stats"),
    schema=[Field(name="velocity", dtype=Float64)],
)
pair_stats = FeatureView(
    name="pair_stats", entities=[customer, merchant], ttl=timedelta(days=1), source=source("pair_stats"),
    schema=[Field(name="pair_count", dtype=Int64)],
)
risk = FeatureService(name="risk", features=[customer_stats[["txn_count", "segment"]], recent_stats])
"""


@dataclass
class FeastRepo:
    python: Path
    path: Path
    project: str

    def run(self, *args: str) -> str:
        out = subprocess.run(
            [str(self.python), "-P", *args], cwd=self.path, capture_output=True, text=True, timeout=300, check=False
        )
        assert out.returncode == 0, f"{args}: {out.stderr[-4000:]}"
        return out.stdout

    def apply(self) -> None:
        self.run("-m", "feast.cli.cli", "apply")

    def write(self, rows: dict[str, list[dict[str, Any]]]) -> None:
        spec = self.path / "rows.json"
        spec.write_text(json.dumps(rows))
        self.run(str(ROOT / "tests" / "feast_tool.py"), "write", str(self.path), str(spec))

    def read(self, features: list[str], entity_rows: list[dict[str, Any]]) -> dict[str, list[list[Any]]]:
        spec = self.path / "request.json"
        spec.write_text(json.dumps({"features": features, "entity_rows": entity_rows}))
        return dict(json.loads(self.run(str(ROOT / "tests" / "feast_tool.py"), "read", str(self.path), str(spec))))


def feast_repo(
    python: Path, path: Path, project: str, connection: str, *, redis_type: str = "redis", extra: str = ""
) -> FeastRepo:
    """A repo on Feast's Redis online store (`connection_string`, `redis_type` as feature_store.yaml has them)."""
    (path / "data").mkdir(parents=True)
    (path / "feature_store.yaml").write_text(
        f"project: {project}\nregistry: data/registry.db\nprovider: local\n"
        f"online_store:\n  type: redis\n  redis_type: {redis_type}\n  connection_string: {connection}\n"
        "entity_key_serialization_version: 3\n"
    )
    (path / "definitions.py").write_text(DEFINITIONS + extra)
    repo = FeastRepo(python, path, project)
    repo.apply()
    return repo


def stats_row(i: int, customer: int, *, shift: int = 0) -> dict[str, Any]:
    """Every type, some nulls (every 7th row), int64 values beyond 2**53."""
    nulls = i % 7 == 0
    return {
        "customer_id": customer,
        "txn_count": 2**62 + i + shift,
        "avg_amount": i * 1.25 + 0.1,
        "score32": i / 3,
        "segment": None if nulls else f"seg-{i % 4}",
        "vip": i % 3 == 0,
        "blob": {"b64": "AP8=" if i % 2 else "eA=="},
        "last_seen": {"epoch": 1_700_000_000 + i},
        "recent": None if nulls else [i, 2**60 + i, -i],
        "tags": [] if i % 5 == 0 else [f"t{i}", "x"],
        "small": -i,
        "event_timestamp": NOW,
    }


@dataclass
class FeastStack:
    stack: Stack
    redis: RedisServer
    repo: FeastRepo


def model(name: str, port: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "path": f"/v1/models/{name}/predict",
        "entity": "customer",
        **extra,
        "versions": [{"name": "v1", "weight": 100, "backend": {"service": {"host": "127.0.0.1", "port": port}}}],
    }


def feast_registry(redis: dict[str, Any], project: str) -> dict[str, Any]:
    """The Feast models of these tests on `redis` (the registry's `feature_store.feast.redis`)."""
    policy_refs = ["customer_stats:txn_count", "recent_stats:velocity"]
    doc = demo_registry_doc(
        feature_store={
            "feast": {
                "redis": redis,
                "project": project,
                "entity_key_serialization_version": 3,
                "feature_views": [
                    {"name": "customer_stats", "entities": ["customer"], "ttl_seconds": 86400},
                    {"name": "recent_stats", "entities": ["customer"], "ttl_seconds": 3600},
                    {"name": "pair_stats", "entities": ["customer", "merchant"], "ttl_seconds": 86400},
                ],
                "feature_services": [
                    {
                        "name": "risk",
                        "features": ["customer_stats:txn_count", "customer_stats:segment", "recent_stats:velocity"],
                    }
                ],
            },
            "timeout_ms": 1000,
            "cache": {"ttl_seconds": 0},
        },
        entities=[
            {"name": "customer", "join_key": "customer_id", "value_type": "int64"},
            {"name": "merchant", "join_key": "merchant_id", "value_type": "string"},
        ],
        ensembles=[],
    )
    doc["broker"]["message_timeout_ms"] = 1500
    doc["models"] = [
        model("stats", free_port(), features=STATS_REFS, batch={"field": "rows", "max_rows": 32}),
        model("reject", free_port(), features=policy_refs),
        model("degraded", free_port(), features=policy_refs, missing_features="forward_degraded"),
        model("nulls", free_port(), features=policy_refs, missing_features="null"),
        model("pair", free_port(), features=["pair_stats:pair_count", "customer_stats:segment"]),
        model("service", free_port(), feature_service="risk"),
    ]
    return doc


@pytest.fixture(scope="module")
def feast_stack(feast_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FeastStack]:
    """Two Feast projects in one Redis; the broker reads project `fraud`."""
    redis = RedisServer(tmp_path_factory.mktemp("feast-redis"))
    redis.start()
    try:
        connection = f"127.0.0.1:{redis.port}"
        fraud = feast_repo(feast_python, tmp_path_factory.mktemp("fraud"), "fraud", connection)
        other = feast_repo(feast_python, tmp_path_factory.mktemp("other"), "other", connection)
        stats = [stats_row(i, c) for i, c in enumerate(CUSTOMERS)]
        partial = {k: v for k, v in stats_row(1, PARTIAL_CUSTOMER).items() if k != "segment"}
        recent = [
            {"customer_id": c, "velocity": i / 2, "event_timestamp": NOW - (7200 if c == STALE_CUSTOMER else 0)}
            for i, c in enumerate([*CUSTOMERS, PARTIAL_CUSTOMER])
        ]
        pairs = [
            {"customer_id": c, "merchant_id": f"m-{i % 3}", "pair_count": i, "event_timestamp": NOW}
            for i, c in enumerate(CUSTOMERS)
        ]
        fraud.write({"customer_stats": [*stats, partial], "recent_stats": recent, "pair_stats": pairs})
        # The same customers in another project, other values: a key that ignored the project would mix them.
        other.write(
            {"customer_stats": [stats_row(i, c, shift=1000) for i, c in enumerate([*CUSTOMERS[:5], OTHER_ONLY])]}
        )
        with run_stack(feast_registry({"url": redis.url}, "fraud"), tmp_path_factory.mktemp("feast-stack")) as stack:
            yield FeastStack(stack, redis, fraud)
    finally:
        redis.stop()


@pytest.fixture
def client_options() -> ClientOptions:
    # 30 s, the budget this module always had: the stack reads a real Feast repo's Redis.
    return ClientOptions(timeout_s=30)


async def predict(session: aiohttp.ClientSession, stack: Stack, name: str, body: dict[str, Any]) -> Reply:
    return await call(session, f"{stack.base}/v1/models/{name}/predict", body)


def expected_rows(feast: dict[str, list[list[Any]]], index: int) -> dict[str, Any]:
    return {name: values[index][0] for name, values in feast.items() if name not in ("customer_id", "merchant_id")}


def assert_same(got: dict[str, Any], feast: dict[str, list[list[Any]]], index: int) -> None:
    """Value for value and type for type, as JSON carries Feast's Python types."""
    want = expected_rows(feast, index)
    assert got == want
    for name, values in feast.items():
        if name in got:
            value, kind = values[index]
            expected = type(None) if kind == "NoneType" else JSON_TYPE[kind]
            assert type(got[name]) is expected, (name, got[name], kind)
            if kind == "list":
                assert [type(v) for v in got[name]] == [type(v) for v in value], name


async def test_features_equal_get_online_features(feast_stack: FeastStack, session: aiohttp.ClientSession) -> None:
    """For 60 entities the model receives exactly what Feast's own get_online_features returns."""
    feast = feast_stack.repo.read(STATS_REFS, [{"customer_id": c} for c in CUSTOMERS])
    replies = await asyncio.gather(
        *(predict(session, feast_stack.stack, "stats", {"customer_id": c, "amount": 1}) for c in CUSTOMERS)
    )
    for i, reply in enumerate(replies):
        assert reply.status == 200, reply.raw
        assert_same(reply.body["features"], feast, i)
    big = replies[1].body["features"]["txn_count"]
    assert big > 2**53 and big == 2**62 + 1  # exact, not a float on the way


async def test_batch_rows_in_one_round_trip(feast_stack: FeastStack, session: aiohttp.ClientSession) -> None:
    """32 rows: each gets its own features, all from exactly one Redis round trip."""
    feast = feast_stack.repo.read(STATS_REFS, [{"customer_id": c} for c in CUSTOMERS[:32]])
    before = commandstats(feast_stack.redis)
    rows = [{"customer_id": c, "n": i} for i, c in enumerate(CUSTOMERS[:32])]
    reply = await predict(session, feast_stack.stack, "stats", {"rows": rows, "_demo": {"stats": {"echo": True}}})
    after = commandstats(feast_stack.redis)
    assert reply.status == 200, reply.raw
    received = reply.body["received"]["rows"]
    assert [r["n"] for r in received] == list(range(32))
    for i, row in enumerate(received):
        assert_same(row["features"], feast, i)
    # One pipeline: 32 HMGETs (one view), no other command, sent in one write.
    assert after["hmget"] - before["hmget"] == 32
    assert after["calls"] - before["calls"] == 32


async def test_batch_limits(feast_stack: FeastStack, session: aiohttp.ClientSession) -> None:
    """Past the declared row limit: 413; a bad row is named by its index."""
    too_many = await predict(session, feast_stack.stack, "stats", {"rows": [{"customer_id": 1}] * 33})
    assert too_many.status == 413, too_many.raw
    assert too_many.error_code() == "too_many_rows"
    bad = await predict(session, feast_stack.stack, "stats", {"rows": [{"customer_id": 1}, {"customer_id": "x"}]})
    assert bad.status == 400
    assert bad.error_code() == "invalid_entity_key"
    assert bad.body["error"]["message"].startswith("rows[1]:")


def commandstats(redis: RedisServer) -> dict[str, int]:
    """HMGET calls and all calls so far, from Redis's own INFO commandstats."""
    text = redis.cli("INFO", "commandstats")
    calls = {m[0]: int(m[1]) for m in re.findall(r"cmdstat_(\w+):calls=(\d+)", text)}
    # INFO itself is counted when it runs: leave the test's own INFO calls out.
    return {"hmget": calls.get("hmget", 0), "calls": sum(n for c, n in calls.items() if c != "info")}


@pytest.mark.parametrize(
    ("model_name", "customer", "status", "expected"),
    [
        ("reject", STALE_CUSTOMER, 422, "'velocity': stale (recent_stats:velocity)"),
        ("degraded", STALE_CUSTOMER, 200, {"txn_count": 2**62 + 3}),
        ("nulls", STALE_CUSTOMER, 200, {"txn_count": 2**62 + 3, "velocity": None}),
        ("service", PARTIAL_CUSTOMER, 422, "'segment': missing (customer_stats:segment)"),
        ("reject", 99_999, 404, "no features are stored for customer_id '99999'"),
        ("reject", OTHER_ONLY, 404, f"no features are stored for customer_id '{OTHER_ONLY}'"),
    ],
    ids=["stale-reject", "stale-forward-degraded", "stale-null", "missing-one-reject", "unknown", "other-project"],
)
async def test_missing_feature_policies(
    feast_stack: FeastStack, session: aiohttp.ClientSession, model_name: str, customer: int, status: int, expected: Any
) -> None:
    """Stale past the view's TTL or never written: refused, forwarded without it (flagged), or sent as null."""
    reply = await predict(session, feast_stack.stack, model_name, {"customer_id": customer})
    assert reply.status == status, reply.raw
    if status != 200:
        assert reply.error_code() in ("missing_features", "unknown_entity")
        message = reply.body["error"]["message"]
        assert expected in message
        assert f"customer_id '{customer}'" in message  # the entity key, never a Redis key
        return
    assert reply.body["features"] == expected
    assert reply.headers.get("x-broker-degraded") == ("missing-features" if model_name == "degraded" else None)


async def test_composite_keys(feast_stack: FeastStack, session: aiohttp.ClientSession) -> None:
    """A view keyed by customer and merchant, beside a customer view, in one request."""
    refs = ["pair_stats:pair_count", "customer_stats:segment"]
    rows = [{"customer_id": c, "merchant_id": f"m-{i % 3}"} for i, c in enumerate(CUSTOMERS[:12])]
    feast = feast_stack.repo.read(refs, rows)
    replies = await asyncio.gather(*(predict(session, feast_stack.stack, "pair", row) for row in rows))
    for i, reply in enumerate(replies):
        assert reply.status == 200, reply.raw
        assert_same(reply.body["features"], feast, i)
    wrong_merchant = await predict(
        session, feast_stack.stack, "pair", {"customer_id": CUSTOMERS[1], "merchant_id": "m-9"}
    )
    assert wrong_merchant.status == 422 and wrong_merchant.error_code() == "missing_features"
    assert "customer_id=" in wrong_merchant.body["error"]["message"]
    no_merchant = await predict(session, feast_stack.stack, "pair", {"customer_id": CUSTOMERS[1]})
    assert no_merchant.status == 400 and no_merchant.error_code() == "missing_entity_key"
    assert "'merchant_id'" in no_merchant.body["error"]["message"]


async def test_feature_service(feast_stack: FeastStack, session: aiohttp.ClientSession) -> None:
    """A model naming a Feast feature service gets the service's features."""
    refs = ["customer_stats:txn_count", "customer_stats:segment", "recent_stats:velocity"]
    feast = feast_stack.repo.read(refs, [{"customer_id": CUSTOMERS[2]}])
    reply = await predict(session, feast_stack.stack, "service", {"customer_id": CUSTOMERS[2]})
    assert reply.status == 200, reply.raw
    assert_same(reply.body["features"], feast, 0)


@pytest.mark.parametrize("value", ["1", 1.5, True, None, 2**63], ids=["string", "float", "bool", "null", "past-int64"])
async def test_int64_key_must_be_an_integer(
    feast_stack: FeastStack, session: aiohttp.ClientSession, value: Any
) -> None:
    """An int64 join key takes JSON integers in range only; anything else is a 400 naming the field."""
    reply = await predict(session, feast_stack.stack, "reject", {"customer_id": value})
    assert reply.status == 400, reply.raw
    assert reply.error_code() == "invalid_entity_key"
    assert "'customer_id'" in reply.body["error"]["message"]


def test_check_against_the_feast_repo(feast_stack: FeastStack, tmp_path: Path) -> None:
    """`check --feast-repo` passes the registry the stack runs, and names what a drifted one gets wrong."""
    repo = feast_stack.repo
    args = ["--feast-repo", str(repo.path), "--feast-python", str(repo.python)]
    ok = subprocess.run(
        feast_stack.stack.cli("check", "--config", str(feast_stack.stack.config), *args),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert "stats: customer_stats:txn_count (Int64, ttl 86400 s)" in ok.stdout
    drifted = json.loads(json.dumps(feast_stack.stack.doc))
    drifted["feature_store"]["feast"]["feature_views"][1]["ttl_seconds"] = 60
    drifted["models"][0]["features"].append("customer_stats:nope")
    config = tmp_path / "drifted.yaml"
    config.write_text(json.dumps(drifted))
    bad = subprocess.run(
        feast_stack.stack.cli("check", "--config", str(config), *args),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert bad.returncode == 2, bad.stdout
    assert "feature view 'recent_stats': ttl_seconds 60 in the registry, 3600 in the repo" in bad.stderr
    assert "'customer_stats:nope' is not a feature of view 'customer_stats'" in bad.stderr


async def test_redis_stopped_503_logged_once_then_recovery(
    feast_stack: FeastStack, session: aiohttp.ClientSession
) -> None:
    """Redis stopped: 503 feature_store_unavailable, one log line per worker; back: answers again. Runs last."""
    stack, redis = feast_stack.stack, feast_stack.redis
    redis.stop()
    try:
        for _ in range(6):
            reply = await predict(session, stack, "reject", {"customer_id": CUSTOMERS[0]})
            assert reply.status == 503, reply.raw
            assert reply.error_code() == "feature_store_unavailable"
    finally:
        redis.start()
    deadline = time.monotonic() + 10
    while True:  # Redis restarted empty (no persistence): the store answers "unknown entity" again
        replies = [await predict(session, stack, "reject", {"customer_id": CUSTOMERS[0]}) for _ in range(6)]
        if all(r.status == 404 for r in replies) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert [r.status for r in replies] == [404] * 6
    log = stack.procs["broker"].log.read_text()
    workers = stack.doc["broker"]["workers"]
    assert 1 <= log.count("feature store unavailable: redis") <= workers
    assert log.count("feature store reachable again") >= 1
