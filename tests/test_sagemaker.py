"""SageMaker versions through a real Envoy: SigV4 checked with botocore, and moto's sagemaker-runtime."""

from __future__ import annotations

import asyncio
import collections
import json
import shutil
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from pydantic import ValidationError

from extproc.envoy import credential_provider
from extproc.process.launcher import free_port, wait_listening
from extproc.registry import SageMakerBackend
from tests.conftest import Proc, Stack, demo_registry_doc, run_stack
from tests.http import call
from tests.sigv4 import sigv4_problem

ACCESS_KEY, SECRET_KEY = "AKIDBROKERTEST", "broker-test-secret"
PATH = "/v1/models/credit-risk/predict"
MOTO_PATH = "/v1/models/credit-risk-moto/predict"
MOTO_ANSWER = {"model": "credit-risk-moto", "score": 0.77}


@dataclass
class SageMakerDouble:
    """A plain-HTTP SageMaker runtime on loopback that checks each signature and answers like a model."""

    port: int = field(default_factory=free_port)
    seen: list[dict[str, Any]] = field(default_factory=list)

    async def invocations(self, request: web.Request) -> web.Response:
        body = await request.read()
        url = f"http://{request.headers['host']}{request.path_qs}"
        problem = sigv4_problem(request.method, url, request.headers, body, ACCESS_KEY, SECRET_KEY)
        self.seen.append({"path": request.path, "headers": dict(request.headers), "problem": problem})
        if problem is not None:
            return web.json_response({"message": problem}, status=403)
        features = orjson.loads(body)["features"]
        return web.json_response({"model": "credit-risk", "version": "v3-sm", "score": 0.5, "features": features})

    async def start(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_post("/endpoints/{name}/invocations", self.invocations)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        return runner


def sagemaker_registry(double_port: int, moto_port: int) -> dict[str, Any]:
    """credit-risk split 50/50 between a service version and a SageMaker one; a moto-only twin."""
    doc = demo_registry_doc()
    model = doc["models"][0]
    model["versions"][0]["weight"] = 50
    model["versions"][1]["weight"] = 0
    sagemaker = {"region": "us-east-1", "credentials": ["environment"]}
    model["versions"].append(
        {
            "name": "v3-sm",
            "weight": 50,
            "backend": {
                "sagemaker": {
                    **sagemaker,
                    "endpoint": "credit-risk-v3",
                    "target_variant": "canary",
                    "endpoint_url": f"http://127.0.0.1:{double_port}",
                }
            },
        }
    )
    moto_backend = {
        "sagemaker": {**sagemaker, "endpoint": "credit-risk-m", "endpoint_url": f"http://127.0.0.1:{moto_port}"}
    }
    doc["models"].append(
        {
            **{k: v for k, v in model.items() if k not in ("versions", "name", "path")},
            "name": "credit-risk-moto",
            "path": MOTO_PATH,
            "versions": [{"name": "m1", "weight": 1, "backend": moto_backend}],
        }
    )
    return doc


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """moto's server on loopback, with one queued sagemaker-runtime answer."""
    binary = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    port = free_port()
    proc = Proc("moto", [binary, "-H", "127.0.0.1", "-p", str(port)], tmp_path_factory.mktemp("moto") / "moto.log")
    proc.start()
    try:
        wait_listening(port, timeout_s=30)
        results = {
            "region": "us-east-1",
            "results": [
                {
                    "Body": json.dumps(MOTO_ANSWER),
                    "ContentType": "application/json",
                    "InvokedProductionVariant": "AllTraffic",
                }
            ],
        }
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/moto-api/static/sagemaker/endpoint-results",
            data=json.dumps(results).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 201
        yield port
    finally:
        proc.stop()


@pytest.fixture(scope="module")
async def double() -> AsyncIterator[SageMakerDouble]:
    fake = SageMakerDouble()
    runner = await fake.start()
    yield fake
    await runner.cleanup()


@pytest.fixture(scope="module")
def sagemaker_stack(double: SageMakerDouble, moto: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Envoy gets AWS credentials from its environment, as from the standard chain."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        env.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        env.delenv("AWS_SESSION_TOKEN", raising=False)
        with run_stack(sagemaker_registry(double.port, moto), tmp_path_factory.mktemp("sagemaker")) as stack:
            yield stack


async def test_service_and_sagemaker_share_one_split(
    sagemaker_stack: Stack, double: SageMakerDouble, session: aiohttp.ClientSession
) -> None:
    """A 50/50 split over a service and a SageMaker version: all 200, and every SageMaker call correctly signed."""
    double.seen.clear()
    replies = await asyncio.gather(
        *(call(session, sagemaker_stack.base + PATH, {"customer_id": f"c-{i + 1}"}) for i in range(100))
    )
    assert all(r.status == 200 for r in replies), [r.raw for r in replies if r.status != 200][:3]
    counts = collections.Counter(r.headers["x-broker-version"] for r in replies)
    assert set(counts) == {"v1", "v3-sm"} and 25 <= counts["v3-sm"] <= 75, counts
    assert len(double.seen) == counts["v3-sm"]
    assert [s["problem"] for s in double.seen] == [None] * len(double.seen)
    first = double.seen[0]
    assert first["path"] == "/endpoints/credit-risk-v3/invocations"
    assert first["headers"]["Host"] == f"127.0.0.1:{double.port}"
    assert first["headers"]["x-amzn-sagemaker-target-variant"] == "canary"
    signed = first["headers"]["Authorization"].split("SignedHeaders=")[1].split(",")[0].split(";")
    assert {"host", "x-amz-date", "x-amzn-sagemaker-target-variant"} <= set(signed)
    sm = next(r for r in replies if r.headers["x-broker-version"] == "v3-sm")
    assert set(sm.body["features"]) == {"income", "debt_ratio", "tenure_months"}


def test_signature_check_can_fail() -> None:
    """The botocore check rejects a wrong secret and a body changed after signing."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    url = "http://127.0.0.1:9/endpoints/e/invocations"
    request = AWSRequest(method="POST", url=url, data=b"{}", headers={"content-type": "application/json"})
    request.headers["x-amz-content-sha256"] = "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "sagemaker", "us-east-1").add_auth(request)
    headers = {**dict(request.headers.items()), "host": "127.0.0.1:9"}  # botocore signs host without setting it
    assert sigv4_problem("POST", url, headers, b"{}", ACCESS_KEY, SECRET_KEY) is None
    assert sigv4_problem("POST", url, headers, b"{}", ACCESS_KEY, "wrong") == "signature mismatch"
    assert "does not match the body" in str(sigv4_problem("POST", url, headers, b"[]", ACCESS_KEY, SECRET_KEY))


async def test_moto_sagemaker_runtime_answers_through_envoy(
    sagemaker_stack: Stack, session: aiohttp.ClientSession
) -> None:
    """A SageMaker-only model against moto's sagemaker-runtime: the client gets moto's answer and the version."""
    reply = await call(session, sagemaker_stack.base + MOTO_PATH, {"customer_id": "c-5"})
    assert reply.status == 200, reply.raw
    assert reply.body == MOTO_ANSWER
    assert reply.headers["x-broker-version"] == "m1"
    assert reply.headers["x-amzn-invoked-production-variant"] == "AllTraffic"


ENDPOINT_URLS: list[tuple[str, str, str | None]] = [
    ("https-anywhere", "https://vpce-1.runtime.sagemaker.eu-west-1.vpce.amazonaws.com", None),
    ("http-loopback", "http://127.0.0.1:4566", None),
    ("http-remote", "http://sagemaker.example.com", "plain http only on loopback"),
    ("with-path", "https://runtime.example.com/prefix", "scheme://host"),
    ("not-http", "ftp://127.0.0.1", "scheme://host"),
]


@pytest.mark.parametrize(("case", "url", "problem"), ENDPOINT_URLS, ids=[e[0] for e in ENDPOINT_URLS])
def test_endpoint_url_rules(case: str, url: str, problem: str | None) -> None:
    """`endpoint_url`: https anywhere, plain http only on loopback, no path."""
    backend = {"endpoint": "e", "region": "us-east-1", "endpoint_url": url}
    if problem is None:
        assert SageMakerBackend.model_validate(backend).endpoint_url == url
    else:
        with pytest.raises(ValidationError, match=problem):
            SageMakerBackend.model_validate(backend)


def test_default_credentials_never_probe_instance_metadata() -> None:
    """By default Envoy's chain is environment + credentials file only: no metadata probe off EC2."""
    provider = credential_provider(SageMakerBackend(endpoint="e", region="us-east-1").credentials).to_dict()
    assert provider == {
        "customCredentialProviderChain": True,
        "environmentCredentialProvider": {},
        "credentialsFileProvider": {},
    }
