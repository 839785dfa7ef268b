"""Both feature sources on a real Redis Cluster (3 masters + 3 replicas on loopback), through a real Envoy.

Feast writes with its SDK (`redis_type: redis_cluster`, and `feast materialize` from a
parquet source); the broker reads what Feast wrote and our own layout beside it, one
pipeline per node; then a master fails over (`CLUSTER FAILOVER`) under traffic, and
finally a whole shard goes away and comes back.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.cluster import RedisCluster

from extproc.process.launcher import free_port, wait_listening
from tests.conftest import FAILED, ClientOptions, Stack, demo_registry_doc, demo_rows, logs_of, run_stack
from tests.http import Reply, call
from tests.redis_cluster import RedisClusterServers
from tests.test_feast import (
    CUSTOMERS,
    NOW,
    STATS_REFS,
    FeastRepo,
    assert_same,
    expected_rows,
    feast_registry,
    feast_repo,
    model,
    stats_row,
)

CLUSTER = {"redis_type": "redis_cluster"}
# Envoy's deadline per broker message: the store's 1000 ms budget plus room for a box this
# loaded (a 503 from the store, not `broker_unavailable`, is what the tests pin).
MESSAGE_TIMEOUT_MS = 3000
OWN_FEATURES = ("income", "debt_ratio", "tenure_months", "late_payments_12m")
OWN_CUSTOMERS = [f"c-{i}" for i in range(1, 61)]
# A view loaded by `feast materialize` from its parquet source, not by the online writer.
PROFILE = """
txn_profile = FeatureView(
    name="txn_profile", entities=[customer], ttl=timedelta(days=1), source=source("txn_profile"),
    schema=[
        Field(name="spend_30d", dtype=Float64), Field(name="txn_90d", dtype=Int64), Field(name="channel", dtype=String),
    ],
)
"""
PROFILE_REFS = ["txn_profile:spend_30d", "txn_profile:txn_90d", "txn_profile:channel"]


@dataclass
class ClusterStacks:
    cluster: RedisClusterServers
    feast: Stack
    own: Stack
    repo: FeastRepo
    # What Feast's own get_online_features returns for CUSTOMERS (STATS_REFS), read before any failover.
    expected: dict[str, list[list[Any]]] = field(default_factory=dict)


def seed_own_layout(cluster: RedisClusterServers) -> None:
    """The demo's rows, in our own layout, written by redis-py's cluster client (one pipeline)."""
    client = RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    try:
        pipe = client.pipeline()
        for key, row in demo_rows().items():
            pipe.hset(key, mapping={k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in row.items()})
        pipe.execute()
    finally:
        client.close()


def own_registry(cluster: RedisClusterServers) -> dict[str, Any]:
    doc = demo_registry_doc(
        feature_store={"redis": {"url": cluster.url, **CLUSTER}, "timeout_ms": 1000, "cache": {"ttl_seconds": 0}}
    )
    doc["broker"]["message_timeout_ms"] = MESSAGE_TIMEOUT_MS
    doc["models"][0]["batch"] = {"field": "rows", "max_rows": 32}
    return doc


def cluster_feast_registry(cluster: RedisClusterServers) -> dict[str, Any]:
    doc = feast_registry({"url": cluster.url, **CLUSTER}, "fraud")
    doc["broker"]["message_timeout_ms"] = MESSAGE_TIMEOUT_MS
    doc["feature_store"]["feast"]["feature_views"].append(
        {"name": "txn_profile", "entities": ["customer"], "ttl_seconds": 86400}
    )
    doc["models"].append(model("profile", free_port(), features=PROFILE_REFS))
    return doc


def materialize(repo: FeastRepo) -> None:
    """Rows in the view's parquet source, loaded into the cluster by Feast's own `feast materialize`."""
    rows = [
        {
            "customer_id": c,
            "spend_30d": i * 10.5,
            "txn_90d": 2**60 + i,
            "channel": ("web", "pos")[i % 2],
            "event_timestamp": NOW,
        }
        for i, c in enumerate(CUSTOMERS)
    ]
    spec = repo.path / "profile.json"
    spec.write_text(json.dumps({"txn_profile": rows}))
    repo.run(str(Path(__file__).parent / "feast_tool.py"), "parquet", str(repo.path), str(spec))
    start = dt.datetime.fromtimestamp(NOW - 86400, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    end = dt.datetime.fromtimestamp(NOW + 60, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    repo.run("-m", "feast.cli.cli", "materialize", start, end, "--views", "txn_profile")


@pytest.fixture(scope="module")
def stacks(feast_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterStacks]:
    """One cluster; Feast's project `fraud` and the demo's own-layout rows in it; a stack reading each."""
    cluster = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster"))
    cluster.start()
    try:
        repo = feast_repo(
            feast_python,
            tmp_path_factory.mktemp("fraud-cluster"),
            "fraud",
            cluster.connection_string,
            redis_type="redis_cluster",
            extra=PROFILE,
        )
        repo.write({"customer_stats": [stats_row(i, c) for i, c in enumerate(CUSTOMERS)]})
        materialize(repo)
        seed_own_layout(cluster)
        expected = repo.read(STATS_REFS, [{"customer_id": c} for c in CUSTOMERS])
        with (
            run_stack(cluster_feast_registry(cluster), tmp_path_factory.mktemp("feast-cluster-stack")) as feast,
            run_stack(own_registry(cluster), tmp_path_factory.mktemp("own-cluster-stack")) as own,
        ):
            yield ClusterStacks(cluster, feast, own, repo, expected)
    finally:
        cluster.stop()


@pytest.fixture(autouse=True)
def _stack_logs_on_failure(request: pytest.FixtureRequest, stacks: ClusterStacks) -> Iterator[None]:
    """Both stacks' logs and the nodes' when a test fails (the shared hook sees only `Stack` arguments)."""
    yield
    if request.node.stash.get(FAILED, False):
        print(stacks.feast.logs(), stacks.own.logs(), logs_of(stacks.cluster.procs), sep="\n")


@pytest.fixture
def client_options() -> ClientOptions:
    # 30 s, the budget this module always had: requests run through a master's failover.
    return ClientOptions(timeout_s=30)


async def predict(session: aiohttp.ClientSession, stack: Stack, name: str, body: dict[str, Any]) -> Reply:
    return await call(session, f"{stack.base}/v1/models/{name}/predict", body)


def own_expected(customer: str) -> dict[str, Any]:
    row = demo_rows()[f"customer:{customer}"]
    return {name: row[name] for name in OWN_FEATURES}


def hmgets(cluster: RedisClusterServers) -> dict[int, int]:
    """HMGET calls so far on each master."""
    return {m.port: cluster.commandstats(m.port).get("hmget", 0) for m in cluster.masters()}


async def test_feast_values_across_three_masters(stacks: ClusterStacks, session: aiohttp.ClientSession) -> None:
    """60 entities spread over all three masters: the model gets exactly what Feast's get_online_features returns."""
    for master in stacks.cluster.masters():
        assert int(stacks.cluster.cli(master.port, "DBSIZE")) > 10, "keys are not spread over every master"
    replies = await asyncio.gather(*(predict(session, stacks.feast, "stats", {"customer_id": c}) for c in CUSTOMERS))
    for i, reply in enumerate(replies):
        assert reply.status == 200, reply.raw
        assert_same(reply.body["features"], stacks.expected, i)


async def test_feast_materialize_from_parquet(stacks: ClusterStacks, session: aiohttp.ClientSession) -> None:
    """Values `feast materialize` loaded from the offline parquet source are what the model gets."""
    feast = stacks.repo.read(PROFILE_REFS, [{"customer_id": c} for c in CUSTOMERS])
    replies = await asyncio.gather(*(predict(session, stacks.feast, "profile", {"customer_id": c}) for c in CUSTOMERS))
    for i, reply in enumerate(replies):
        assert reply.status == 200, reply.raw
        assert_same(reply.body["features"], feast, i)
    assert replies[1].body["features"] == {"spend_30d": 10.5, "txn_90d": 2**60 + 1, "channel": "pos"}


async def test_batch_one_pipeline_per_node(stacks: ClusterStacks, session: aiohttp.ClientSession) -> None:
    """32 rows on three masters: each master gets exactly the HMGETs for its own keys (no redirect, no retry)."""
    before = hmgets(stacks.cluster)
    rows = [{"customer_id": c, "n": i} for i, c in enumerate(CUSTOMERS[:32])]
    reply = await predict(session, stacks.feast, "stats", {"rows": rows, "_demo": {"stats": {"echo": True}}})
    after = hmgets(stacks.cluster)
    assert reply.status == 200, reply.raw
    for i, row in enumerate(reply.body["received"]["rows"]):
        assert row["n"] == i
        assert_same(row["features"], stacks.expected, i)
    per_master = {port: after[port] - before[port] for port in after}
    assert sum(per_master.values()) == 32, per_master
    assert all(n > 0 for n in per_master.values()), per_master  # the batch really spanned the cluster


async def test_own_layout_on_the_cluster(stacks: ClusterStacks, session: aiohttp.ClientSession) -> None:
    """Our own layout (`customer:<id>` hashes) read from the cluster, one entity and a batch of 32."""
    replies = []
    for first in range(0, len(OWN_CUSTOMERS), 20):  # 20 at a time: correctness, not a load test
        replies += await asyncio.gather(
            *(
                predict(session, stacks.own, "credit-risk", {"customer_id": c})
                for c in OWN_CUSTOMERS[first : first + 20]
            )
        )
    for customer, reply in zip(OWN_CUSTOMERS, replies, strict=True):
        assert reply.status == 200, reply.raw
        assert reply.body["features"] == own_expected(customer)
    rows = [{"customer_id": c} for c in OWN_CUSTOMERS[:32]]
    batch = await predict(session, stacks.own, "credit-risk", {"rows": rows, "_demo": {"credit-risk": {"echo": True}}})
    assert batch.status == 200, batch.raw
    assert [r["features"] for r in batch.body["received"]["rows"]] == [own_expected(c) for c in OWN_CUSTOMERS[:32]]
    unknown = await predict(session, stacks.own, "credit-risk", {"customer_id": "nobody"})
    assert unknown.status == 404 and unknown.error_code() == "unknown_entity"


def test_check_sees_the_cluster(stacks: ClusterStacks, tmp_path: Path) -> None:
    """`check --feast-repo` passes the cluster registry, and fails one that reads the cluster as one Redis."""
    args = ["--feast-repo", str(stacks.repo.path), "--feast-python", str(stacks.repo.python)]
    ok = subprocess.run(
        stacks.feast.cli("check", "--config", str(stacks.feast.config), *args),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert "txn_profile" in ok.stdout  # described from the repo: its type and TTL
    assert "view 'txn_profile', which has never been materialized" not in ok.stdout + ok.stderr
    single = dict(stacks.feast.doc)
    single["feature_store"] = {**single["feature_store"], "feast": {**single["feature_store"]["feast"]}}
    single["feature_store"]["feast"]["redis"] = {"url": stacks.cluster.url}
    config = tmp_path / "single.yaml"
    config.write_text(json.dumps(single))
    bad = subprocess.run(
        stacks.feast.cli("check", "--config", str(config), *args),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert bad.returncode == 2, bad.stdout
    assert (
        "the repo's feature_store.yaml has redis_type redis_cluster, "
        "the registry's feature_store.feast.redis has redis_type redis"
    ) in bad.stderr


@dataclass
class Outcome:
    kind: str
    status: int
    right: bool
    started: float
    seconds: float


async def traffic(
    session: aiohttp.ClientSession, stacks: ClusterStacks, stop: asyncio.Event, outcomes: list[Outcome]
) -> None:
    """One client in a loop until `stop`: a Feast entity, a Feast batch of 8, an own-layout entity, in turn."""
    i = 0
    while not stop.is_set():
        i += 1
        started = time.monotonic()
        match i % 3:
            case 0:
                n = i % len(CUSTOMERS)
                reply = await predict(session, stacks.feast, "stats", {"customer_id": CUSTOMERS[n]})
                right = reply.status == 200 and reply.body["features"] == expected_rows(stacks.expected, n)
                kind = "feast"
            case 1:
                first = i % (len(CUSTOMERS) - 8)
                rows = [{"customer_id": c} for c in CUSTOMERS[first : first + 8]]
                reply = await predict(
                    session, stacks.feast, "stats", {"rows": rows, "_demo": {"stats": {"echo": True}}}
                )
                right = reply.status == 200 and [r["features"] for r in reply.body["received"]["rows"]] == [
                    expected_rows(stacks.expected, first + k) for k in range(8)
                ]
                kind = "feast-batch"
            case _:
                customer = OWN_CUSTOMERS[i % len(OWN_CUSTOMERS)]
                reply = await predict(session, stacks.own, "credit-risk", {"customer_id": customer})
                right = reply.status == 200 and reply.body["features"] == own_expected(customer)
                kind = "own"
        if reply.status == 503:
            right = reply.error_code() == "feature_store_unavailable"
        outcomes.append(Outcome(kind, reply.status, right, started, time.monotonic() - started))


async def test_failover_under_traffic(stacks: ClusterStacks, session: aiohttp.ClientSession) -> None:
    """`CLUSTER FAILOVER` on a master's replica during traffic: every answer is right or the documented 503."""
    cluster = stacks.cluster
    master = cluster.masters()[0]
    replica = cluster.replica_of(master)
    stop = asyncio.Event()
    outcomes: list[Outcome] = []
    clients = [asyncio.create_task(traffic(session, stacks, stop, outcomes)) for _ in range(6)]
    try:
        await asyncio.sleep(0.5)
        switch_start = time.monotonic()
        switch_seconds = await asyncio.to_thread(cluster.failover, replica)
        settled = time.monotonic()
        await asyncio.sleep(1.5)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*clients), timeout=30)
    during = [o for o in outcomes if switch_start <= o.started < settled]
    after = [o for o in outcomes if o.started >= settled + 0.5]
    slowest = max(o.seconds for o in outcomes) * 1000
    print(
        f"failover settled in {switch_seconds:.2f}s; {len(outcomes)} requests: {Counter(o.status for o in outcomes)}; "
        f"during the switch {Counter(o.status for o in during)}; slowest {slowest:.0f} ms"
    )
    wrong = [o for o in outcomes if not o.right or o.status not in (200, 503)]
    assert not wrong, wrong[:5]  # never a missing or wrong feature, never another status
    assert len(during) >= 6, "too little traffic during the switch to say anything"
    assert after and all(o.status == 200 for o in after), Counter(o.status for o in after)
    assert cluster.commandstats(replica.port).get("hmget", 0) > 0  # the new master serves the reads
    assert {o.kind for o in after} == {"feast", "feast-batch", "own"}


async def test_shard_lost_503_logged_then_back(stacks: ClusterStacks, session: aiohttp.ClientSession) -> None:
    """A master and its replica stopped: 503 (never a wrong answer), logged once per worker; restarted: answers again.

    Runs last. Keys of the other shards keep answering until the cluster marks the shard
    failed (node timeout); from then on Redis refuses every key (cluster-require-full-coverage).
    """
    cluster = stacks.cluster
    master = cluster.masters()[0]
    replica = cluster.replica_of(master)
    log_file = stacks.own.procs["broker"].log
    log_start = len(log_file.read_text())
    lost = [p for p in cluster.procs if p.cmd[2] in (str(master.port), str(replica.port))]
    for proc in lost:
        proc.stop()
    try:
        statuses: Counter[int] = Counter()
        for customer in OWN_CUSTOMERS[:12]:
            reply = await predict(session, stacks.own, "credit-risk", {"customer_id": customer})
            statuses[reply.status] += 1
            if reply.status == 503:
                assert reply.error_code() == "feature_store_unavailable"
            else:
                assert reply.status == 200 and reply.body["features"] == own_expected(customer), reply.raw
        assert statuses[503] > 0, statuses
    finally:
        for proc in lost:
            proc.start()
    for node in (master, replica):  # a restarted node refuses connections until it listens
        wait_listening(node.port)
    cluster.wait_settled()
    deadline = time.monotonic() + 15
    while True:  # the shard came back empty (no persistence): its keys are unknown, not unavailable
        replies = [await predict(session, stacks.own, "credit-risk", {"customer_id": c}) for c in OWN_CUSTOMERS[:12]]
        if all(r.status in (200, 404) for r in replies) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert {r.status for r in replies} <= {200, 404}, Counter(r.status for r in replies)
    assert 200 in {r.status for r in replies} and 404 in {r.status for r in replies}
    whole = log_file.read_text()
    workers = stacks.own.doc["broker"]["workers"]
    # Once per worker, not once per failing request or per turn of failing and answering
    # (the failover test before may have reported an outage of its own).
    assert whole[log_start:].count("feature store unavailable:") <= workers, whole[log_start:]
    assert 1 <= whole.count("feature store unavailable:") <= 2 * workers, whole
    assert whole.count("feature store reachable again") >= 1, whole
