"""Ground truth joined to records the broker shipped to AWS (moto in server mode): the DynamoDB + S3 path."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from extproc.adapters.aws_audit import AwsAuditStore
from extproc.audit import find_spooled
from extproc.registry import AwsAuditSink
from tests.aws import BUCKET, PREFIX, TABLE, Moto, audited_registry, running_moto, url
from tests.conftest import Stack, run_stack
from tests.http import call

MODEL = "scored"
SHIPPED_S = 30


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    with running_moto(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture(scope="module")
def stack(moto: Moto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Envoy, broker and control plane auditing one model with ground truth to moto."""
    sink = AwsAuditSink(bucket=BUCKET, table=TABLE, prefix=PREFIX, endpoint_url=moto.url)
    AwsAuditStore(sink, timeout_s=30).create_resources()
    doc = audited_registry(moto.url, [MODEL])
    doc["models"][0]["feedback"] = {"kind": "regression", "answer_field": "score"}
    with run_stack(doc, tmp_path_factory.mktemp("feedback-aws")) as running:
        yield running


async def test_truth_joins_a_record_read_back_from_aws(stack: Stack, session: aiohttp.ClientSession) -> None:
    """Once the record left the spool for S3 + DynamoDB, the truth still finds it: MAE per version, 404 elsewhere."""
    reply, other = [await call(session, url(stack, MODEL), {"customer_id": c, "amount": 1200}) for c in ("c-1", "c-2")]
    assert reply.status == other.status == 200, reply.body
    request_id, score = reply.headers["x-request-id"], reply.body["score"]
    spool = Path(stack.workdir) / "spool"
    deadline = time.monotonic() + SHIPPED_S
    for _ in range(SHIPPED_S * 4):  # the shipper moves sealed segments to S3 + DynamoDB, then removes them
        if find_spooled(spool, request_id) is None or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.25)
    assert find_spooled(spool, request_id) is None, "the record never left the spool"
    posted = await call(session, stack.base + "/v1/feedback", {"request_id": request_id, "truth": score + 0.25})
    assert posted.status == 200, posted.body
    assert posted.body["abs_error"] == pytest.approx(0.25) and posted.body["model"] == MODEL
    missing = await call(session, stack.base + "/v1/feedback", {"request_id": "not-in-aws", "truth": 1.0})
    assert missing.status == 404 and missing.error_code() == "unknown_request"
    worded = {"request_id": other.headers["x-request-id"], "truth": "high"}
    text = await call(session, stack.base + "/v1/feedback", worded)
    assert text.status == 400 and text.error_code() == "invalid_feedback"
