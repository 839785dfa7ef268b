"""Helpers of the audit data-plane tests: moto as AWS on loopback, audited stacks, load and read-back."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import orjson
import pytest

from extproc.audit import record_at
from extproc.process.launcher import free_port, wait_listening
from tests.conftest import Proc, Stack, demo_registry_doc
from tests.http import Reply, call

AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET, TABLE, PREFIX = "broker-audit", "broker-audit", "audit"


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


@contextlib.contextmanager
def running_moto(workdir: Path) -> Iterator[Moto]:
    """A started moto server with the standard credential chain set, for the broker too."""
    with pytest.MonkeyPatch.context() as env:
        for name, value in AWS_ENV.items():
            env.setenv(name, value)
        server = Moto(workdir)
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
    # As the Redis stack does: a loaded CI box must not turn a slow ext_proc answer into a 503
    # (the exact counts below are of answered requests, and a timeout is not what they test).
    doc["broker"]["message_timeout_ms"] = 1500
    return doc


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


async def audit_status(config: str) -> dict[str, Any]:
    """`model-broker audit status` as JSON."""
    done = await asyncio.to_thread(run_cli, "audit", "status", "--config", config)
    assert done.returncode == 0, done.stderr
    status: dict[str, Any] = json.loads(done.stdout)
    return status


async def wait_for_status(
    config: str, condition: Callable[[dict[str, Any]], bool], timeout_s: float = 60.0
) -> dict[str, Any]:
    """Poll `audit status` until `condition` holds; the last status otherwise (the caller's assert shows it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = await audit_status(config)
        if condition(status) or time.monotonic() > deadline:
            assert condition(status), status
            return status
        await asyncio.sleep(0.5)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "extproc.cli", *args], capture_output=True, text=True, timeout=60, check=False
    )


async def wait_listed(
    config: str, model: str, until: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 30.0
) -> list[dict[str, Any]]:
    """Poll `audit list --model` (the last hour) until its summaries meet `until`; those summaries."""
    deadline = time.monotonic() + timeout_s
    while True:
        done = await asyncio.to_thread(run_cli, "audit", "list", "--model", model, "--since", "1h", "-c", config)
        assert done.returncode == 0, done.stderr
        listed: list[dict[str, Any]] = json.loads(done.stdout)
        if until(listed) or time.monotonic() > deadline:
            assert until(listed), f"`audit list --model {model}` not as expected within {timeout_s:.0f} s"
            return listed
        await asyncio.sleep(0.5)
