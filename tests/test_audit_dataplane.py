"""The audit trail through a real Envoy, the broker and moto (server mode, real HTTP) as AWS."""

from __future__ import annotations

import asyncio
import collections
import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import orjson
import pytest

from extproc.adapters.aws_audit import AwsAuditStore
from extproc.audit import REDACTED, record_at
from extproc.process.launcher import free_port, wait_listening
from extproc.registry import AwsAuditSink
from tests.conftest import Proc, Stack, demo_registry_doc, run_stack
from tests.http import Reply, call

AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET, TABLE, PREFIX = "broker-audit", "broker-audit", "audit"
SENTINEL = "SECRET-4242-SENTINEL"


class Moto:
    """`moto_server` on a free loopback port; SIGSTOP makes AWS unreachable while keeping its state."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        binary = str(Path(sys.executable).parent / "moto_server")
        self.proc = Proc("moto", [binary, "-H", "127.0.0.1", "-p", str(self.port)], workdir / "moto.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, service: str) -> Any:
        return boto3.client(service, endpoint_url=self.url, region_name="us-east-1")

    def items(self, model: str) -> list[dict[str, Any]]:
        """Every DynamoDB item of `model`, from the model-timestamp index."""
        ddb, found = self.client("dynamodb"), []
        args: dict[str, Any] = {
            "TableName": TABLE,
            "IndexName": "model-timestamp",
            "KeyConditionExpression": "#m = :m",
            "ExpressionAttributeNames": {"#m": "model"},
            "ExpressionAttributeValues": {":m": {"S": model}},
        }
        while True:
            page = ddb.query(**args)
            found += page["Items"]
            if "LastEvaluatedKey" not in page:
                return found
            args["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def keys(self, model: str) -> list[str]:
        s3, found = self.client("s3"), []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=PREFIX + "/"):
            found += [o["Key"] for o in page.get("Contents", []) if f"/model={model}/" in o["Key"]]
        return found

    def objects(self, keys: list[str]) -> list[bytes]:
        s3 = self.client("s3")
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda k: s3.get_object(Bucket=BUCKET, Key=k)["Body"].read(), keys))

    def records(self, model: str) -> list[dict[str, Any]]:
        """Every record in `model`'s objects (gzip JSON Lines), duplicates included if there were any."""
        return [orjson.loads(line) for body in self.objects(self.keys(model)) for line in gzip.decompress(body).split()]

    def record_of(self, item: dict[str, Any]) -> dict[str, Any]:
        """The record an item points at: its object's byte range and line, as `audit show` reads it."""
        where = item["s3_range"]["S"]
        body = self.client("s3").get_object(Bucket=BUCKET, Key=item["s3_key"]["S"], Range=where)["Body"].read()
        record = record_at(body, int(item["s3_line"]["N"]))
        assert record is not None and record["request_id"] == item["request_id"]["S"]
        return record


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    with pytest.MonkeyPatch.context() as env:
        for name, value in AWS_ENV.items():
            env.setenv(name, value)  # the standard credential chain, for the broker too
        server = Moto(tmp_path_factory.mktemp("moto"))
        server.proc.start()
        try:
            wait_listening(server.port)
            yield server
        finally:
            server.proc.signal(signal.SIGCONT)
            server.proc.stop()


def clone_model(doc: dict[str, Any], name: str) -> dict[str, Any]:
    """The demo model under another name and path, on its own model ports."""
    base = doc["models"][0]
    return {
        **base,
        "name": name,
        "path": f"/v1/models/{name}/predict",
        "versions": [
            {**v, "backend": {"service": {**v["backend"]["service"], "port": free_port()}}} for v in base["versions"]
        ],
    }


def audited_registry(endpoint_url: str, models: list[str], **spool: Any) -> dict[str, Any]:
    doc = demo_registry_doc()
    doc["models"] = [clone_model(doc, name) for name in models]
    doc.pop("ensembles", None)  # the demo ensemble calls models these stacks replace
    doc["audit"] = {
        "spool": {"dir": "spool", "seal_after_ms": 300, "fsync_interval_ms": 200, **spool},
        "sink": {"aws": {"bucket": BUCKET, "table": TABLE, "prefix": PREFIX, "endpoint_url": endpoint_url}},
        "redact": ["ssn", "contact.email"],
        "ship_interval_ms": 200,
    }
    doc["audit"]["sink"]["aws"]["timeout_ms"] = 1000
    return doc


@pytest.fixture(scope="module")
def aws_stack(moto: Moto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Envoy + broker auditing four models to moto; each test owns one model, so its counts are its own."""
    AwsAuditStore(AwsAuditSink(bucket=BUCKET, table=TABLE, prefix=PREFIX, endpoint_url=moto.url)).create_resources()
    doc = audited_registry(moto.url, ["audit-count", "audit-outage", "audit-misc", "audit-kill"])
    with run_stack(doc, tmp_path_factory.mktemp("aws-stack")) as stack:
        yield stack


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as client:
        yield client


def url(stack: Stack, model: str) -> str:
    return f"{stack.base}/v1/models/{model}/predict"


async def send_many(
    session: aiohttp.ClientSession, target: str, count: int, body: Callable[[int], bytes], concurrency: int = 16
) -> list[tuple[bytes, Reply]]:
    limit = asyncio.Semaphore(concurrency)

    async def one(i: int) -> tuple[bytes, Reply]:
        async with limit:
            sent = body(i)
            return sent, await call(session, target, data=sent)

    return await asyncio.gather(*(one(i) for i in range(count)))


def demo_body(i: int) -> bytes:
    return orjson.dumps({"customer_id": f"c-{i % 100 + 1}", "amount": i})


async def wait_for_items(
    moto: Moto, model: str, at_least: int, timeout_s: float = 60.0, ids: set[str] | None = None
) -> list[dict[str, Any]]:
    """Poll until `at_least` items of `model` (among `ids`, when given) are in DynamoDB, or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        items = await asyncio.to_thread(moto.items, model)
        found = [i for i in items if ids is None or i["request_id"]["S"] in ids]
        if len(found) >= at_least or time.monotonic() > deadline:
            return items
        await asyncio.sleep(0.5)


def check_record(record: dict[str, Any], sent: bytes, reply: Reply) -> None:
    """The shipped record is what the client sent and what it received, byte for byte by hash."""
    assert record["request_id"] == reply.headers["x-request-id"]
    assert record["input"] == orjson.loads(sent)
    assert record["response"] == {"status": reply.status, "body": reply.body}
    assert record["version"] == reply.headers["x-broker-version"]
    assert record["sha256"] == {
        "request": hashlib.sha256(sent).hexdigest(),
        "response": hashlib.sha256(reply.raw).hexdigest(),
    }
    assert record["features"] == reply.body["features"]
    assert record["latency_ms"]["upstream"] > 0


async def test_every_request_lands_once_in_s3_and_dynamodb(
    aws_stack: Stack, moto: Moto, session: aiohttp.ClientSession
) -> None:
    """1,000 requests → exactly 1,000 DynamoDB items and 1,000 records in a few segment objects, as the client saw."""
    results = await send_many(session, url(aws_stack, "audit-count"), 1000, demo_body)
    assert collections.Counter(r.status for _, r in results) == {200: 1000}
    items = await wait_for_items(moto, "audit-count", 1000)
    assert len(items) == 1000
    keys = moto.keys("audit-count")
    assert all(k.endswith(".jsonl.gz") for k in keys) and len(keys) <= 100  # one object per segment, not per record
    by_id = {r.headers["x-request-id"]: (sent, r) for sent, r in results}
    assert {i["request_id"]["S"] for i in items} == set(by_id)
    assert {i["s3_key"]["S"] for i in items} == set(keys)
    records = moto.records("audit-count")
    assert sorted(r["request_id"] for r in records) == sorted(by_id)  # each exactly once
    for record in records:
        check_record(record, *by_id[record["request_id"]])
    for item in items[::50]:
        assert moto.record_of(item)["request_id"] == item["request_id"]["S"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "extproc.cli", *args], capture_output=True, text=True, timeout=60, check=False
    )


async def test_audit_cli_reads_back_from_aws(aws_stack: Stack, moto: Moto, session: aiohttp.ClientSession) -> None:
    """`audit show` prints a request's record from S3; `audit list` finds it by model and time range."""
    sent = b'{"customer_id": "c-5", "amount": 10}'
    reply = await call(session, url(aws_stack, "audit-misc"), data=sent)
    request_id = reply.headers["x-request-id"]
    await wait_for_items(moto, "audit-misc", 1, ids={request_id})
    config = str(aws_stack.config)
    shown = await asyncio.to_thread(run_cli, "audit", "show", request_id, "--config", config)
    assert shown.returncode == 0, shown.stderr
    check_record(json.loads(shown.stdout), sent, reply)
    listed = await asyncio.to_thread(run_cli, "audit", "list", "--model", "audit-misc", "--since", "1h", "-c", config)
    assert listed.returncode == 0, listed.stderr
    assert request_id in [s["request_id"] for s in json.loads(listed.stdout)]
    missing = await asyncio.to_thread(run_cli, "audit", "show", "no-such-id", "--config", config)
    assert missing.returncode == 1 and "no audit record" in missing.stderr


async def test_records_of_the_first_layout_are_still_found(aws_stack: Stack, moto: Moto) -> None:
    """A record shipped one object per record, as before segment objects, is shown and listed as it was."""
    record = {
        "schema": 1,
        "request_id": "first-layout-1",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime()),
        "model": "audit-misc",
        "version": "v1",
        "route": "audit-misc",
        "registry_version": "old",
        "entity": {"name": "customer", "key": "c-1"},
        "parent_request_id": None,
        "response": {"status": 200, "body": {"score": 0.5}},
        "sha256": {"request": "aa", "response": "bb"},
        "latency_ms": {"total": 1.5},
        "error_code": None,
    }
    key = f"{PREFIX}/date={record['timestamp'][:10]}/model=audit-misc/first-layout-1.json"
    moto.client("s3").put_object(Bucket=BUCKET, Key=key, Body=orjson.dumps(record))
    item = {
        "request_id": {"S": "first-layout-1"},
        "timestamp": {"S": record["timestamp"]},
        "model": {"S": "audit-misc"},
    }
    item |= {"status": {"N": "200"}, "latency_ms": {"N": "1.5"}, "s3_key": {"S": key}}
    moto.client("dynamodb").put_item(TableName=TABLE, Item=item)
    config = str(aws_stack.config)
    shown = await asyncio.to_thread(run_cli, "audit", "show", "first-layout-1", "--config", config)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == record
    listed = await asyncio.to_thread(run_cli, "audit", "list", "--model", "audit-misc", "--since", "1h", "-c", config)
    assert "first-layout-1" in [s["request_id"] for s in json.loads(listed.stdout)]


async def test_aws_outage_loses_nothing_and_duplicates_nothing(
    aws_stack: Stack, moto: Moto, session: aiohttp.ClientSession
) -> None:
    """AWS unreachable mid-run: every request is still answered; once back, exactly one item and object each."""
    target = url(aws_stack, "audit-outage")
    before = await send_many(session, target, 100, demo_body)
    moto.proc.signal(signal.SIGSTOP)
    try:
        during = await send_many(session, target, 200, demo_body)
        spooled = sum(p.stat().st_size for p in (aws_stack.workdir / "spool").rglob("*") if p.is_file())
        assert spooled > 0  # the records wait in the spool
    finally:
        moto.proc.signal(signal.SIGCONT)
    results = before + during
    assert collections.Counter(r.status for _, r in results) == {200: 300}
    items = await wait_for_items(moto, "audit-outage", 300)
    await asyncio.sleep(1.5)  # a few more ship rounds: a late duplicate would show now
    items = await asyncio.to_thread(moto.items, "audit-outage")
    assert len(items) == 300
    assert {i["request_id"]["S"] for i in items} == {r.headers["x-request-id"] for _, r in results}
    assert sorted(r["request_id"] for r in moto.records("audit-outage")) == sorted(i["request_id"]["S"] for i in items)


async def test_redacted_fields_never_leave_the_broker(
    aws_stack: Stack, moto: Moto, session: aiohttp.ClientSession
) -> None:
    """Redacted values reach neither the spool, S3 nor DynamoDB; the record shows where they were."""
    sent = {"customer_id": "c-9", "ssn": SENTINEL, "contact": {"email": SENTINEL, "city": "Lyon"}}
    reply = await call(session, url(aws_stack, "audit-misc"), sent)
    assert reply.status == 200
    request_id = reply.headers["x-request-id"]
    spool = b"".join(p.read_bytes() for p in (aws_stack.workdir / "spool").rglob("*") if p.is_file())
    assert SENTINEL.encode() not in spool
    items = await wait_for_items(moto, "audit-misc", 1, ids={request_id})
    assert SENTINEL not in json.dumps(items)
    (item,) = [i for i in items if i["request_id"]["S"] == request_id]
    (raw,) = moto.objects([item["s3_key"]["S"]])
    assert SENTINEL.encode() not in gzip.decompress(raw)
    record = moto.record_of(item)
    assert record["input"]["ssn"] == REDACTED
    assert record["input"]["contact"] == {"email": REDACTED, "city": "Lyon"}


async def test_failed_executions_are_audited(aws_stack: Stack, moto: Moto, session: aiohttp.ClientSession) -> None:
    """Broker refusals, Envoy's own refusal and a model's error each get a record with what the client saw."""
    target = url(aws_stack, "audit-misc")
    cases = [
        (b'{"amount": 1}', "missing_entity_key"),  # decided by the broker
        (b"", "invalid_json"),  # decided by Envoy before any body phase
        (b'{"customer_id": "c-1", "amount": "lots"}', "http_400"),  # the model's own 400
    ]
    replies = [(await call(session, target, data=body), code) for body, code in cases]
    assert [r.status for r, _ in replies] == [400, 400, 400]
    wanted = {r.headers["x-request-id"]: (r, code) for r, code in replies}
    found = await wait_for_items(moto, "audit-misc", 3, ids=set(wanted))
    items = {i["request_id"]["S"]: i for i in found}
    for request_id, (reply, code) in wanted.items():
        assert items[request_id]["status"] == {"N": "400"}
        assert items[request_id]["error_code"] == {"S": code}
        assert moto.record_of(items[request_id])["response"]["body"] == reply.body
    model_error = items[replies[2][0].headers["x-request-id"]]
    assert model_error["version"]["S"] == replies[2][0].headers["x-broker-version"]


async def test_broker_sigkilled_under_load_keeps_every_answered_record(
    aws_stack: Stack, moto: Moto, session: aiohttp.ClientSession
) -> None:
    """Broker SIGKILLed mid-load and restarted: every 2xx the client saw has exactly one record."""
    target = url(aws_stack, "audit-kill")
    seen: list[tuple[bytes, Reply]] = []
    stop_at = time.monotonic() + 4.0

    async def client(worker: int) -> None:
        for n in range(500):
            if time.monotonic() > stop_at:
                return
            sent = demo_body(worker * 1000 + n)
            reply = await call(session, target, data=sent)
            seen.append((sent, reply))
            if reply.status != 200:
                await asyncio.sleep(0.05)

    load = asyncio.gather(*(client(w) for w in range(8)))
    await asyncio.sleep(1.2)
    aws_stack.procs["broker"].kill()
    await asyncio.sleep(0.3)
    await asyncio.to_thread(aws_stack.start_broker)
    await load
    statuses = collections.Counter(r.status for _, r in seen)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[503] > 0, "the kill should have been visible"
    answered = {r.headers["x-request-id"]: (sent, r) for sent, r in seen if r.status == 200}
    items = await wait_for_items(moto, "audit-kill", len(answered))
    await asyncio.sleep(1.5)
    items = await asyncio.to_thread(moto.items, "audit-kill")
    ids = [i["request_id"]["S"] for i in items]
    assert len(ids) == len(set(ids)), "a record was shipped twice"
    assert sorted(r["request_id"] for r in moto.records("audit-kill")) == sorted(ids), "S3 and DynamoDB disagree"
    audited_2xx = {i["request_id"]["S"] for i in items if i["status"]["N"] == "200"}
    assert set(answered) <= audited_2xx, len(set(answered) - audited_2xx)
    # The only other 200 records: the model answered and the record was spooled (spool before
    # release), then the kill came before Envoy got the broker's reply, so the client saw 503.
    failed = {r.headers.get("x-request-id") for _, r in seen if r.status == 503}
    assert audited_2xx - set(answered) <= failed, audited_2xx - set(answered) - failed


@pytest.fixture
def full_spool_stack(tmp_path: Path) -> Iterator[Stack]:
    """One worker, a 4 KiB spool, and an AWS endpoint nobody listens on: the spool can only fill."""
    doc = audited_registry(f"http://127.0.0.1:{free_port()}", ["audit-full"], max_bytes=4096, segment_bytes=1024)
    doc["broker"]["workers"] = 1
    with run_stack(doc, tmp_path) as stack:
        yield stack


async def test_full_spool_fails_closed_with_503_json(full_spool_stack: Stack, session: aiohttp.ClientSession) -> None:
    """Spool full under `fail_closed`: 503 audit_unavailable JSON, and not one byte past the bound."""
    target = url(full_spool_stack, "audit-full")
    replies = [await call(session, target, data=demo_body(i)) for i in range(15)]
    statuses = [r.status for r in replies]
    first_refusal = statuses.index(503)
    assert first_refusal > 0 and set(statuses[:first_refusal]) == {200}, statuses
    assert set(statuses[first_refusal:]) == {503}, statuses
    assert replies[-1].error_code() == "audit_unavailable"
    spooled = sum(p.stat().st_size for p in (full_spool_stack.workdir / "spool").rglob("*") if p.is_file())
    assert 0 < spooled <= 4096
    assert os.listdir(full_spool_stack.workdir / "spool")
