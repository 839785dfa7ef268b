"""Open Inference Protocol models through the real stack: MLServer behind, stock tritonclient in front.

MLServer runs from its own virtualenv (scripts/mlserver-venv) and serves scikit-learn models
the fixture trains (tests/mlserver_models.py); features live in the real Redis. Every
prediction through the broker is checked against MLServer called directly with the same
features written by hand.
"""

from __future__ import annotations

import http.client
import json
import random
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from extproc.process.launcher import free_port
from tests.conftest import ROOT, Proc, RedisServer, Stack, demo_registry_doc, run_stack

FEATURES = ("income", "debt_ratio", "age", "tenure")
ENTITIES = [f"a-{i}" for i in range(60)]
# A stored value no FP32 tensor can carry: the broker must name it, never send a zero.
BAD_ENTITY = "a-bad"
MLSERVER_START_S = 240.0


def feature_rows() -> dict[str, dict[str, Any]]:
    """Deterministic rows from the distribution the models were trained on."""
    rng = random.Random(14)
    rows = {
        key: {
            "income": round(rng.gauss(50.0, 15.0), 3),
            "debt_ratio": round(rng.uniform(0.0, 1.0), 4),
            "age": rng.randint(18, 79),
            "tenure": round(rng.uniform(0.0, 30.0), 2),
        }
        for key in ENTITIES
    }
    rows[BAD_ENTITY] = {"income": "lots", "debt_ratio": 0.5, "age": 40, "tenure": 2.0}
    return rows


@dataclass
class MLServer:
    port: int
    proc: Proc

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def infer_path(self, model: str, version: str | None = None) -> str:
        return f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"


def _wait_models_ready(port: int, paths: list[str], proc: Proc) -> None:
    deadline = time.monotonic() + MLSERVER_START_S
    pending = list(paths)
    while pending and time.monotonic() < deadline:
        if proc.popen is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"mlserver exited:\n{proc.log.read_text(errors='replace')[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{pending[0]}", timeout=2) as resp:
                if resp.status == 200:
                    pending.pop(0)
                    continue
        except OSError:
            pass
        time.sleep(0.5)
    if pending:
        raise RuntimeError(f"mlserver: {pending} not ready after {MLSERVER_START_S:.0f}s")


@pytest.fixture(scope="module")
def mlserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MLServer]:
    """MLServer from its cached virtualenv, serving the models trained here."""
    venv = subprocess.run(
        [str(ROOT / "scripts" / "mlserver-venv")], check=True, capture_output=True, text=True, timeout=1800
    ).stdout.strip()
    root = tmp_path_factory.mktemp("mlserver")
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    python = Path(venv) / "bin" / "python"
    train = [str(python), str(ROOT / "tests" / "mlserver_models.py"), str(root), str(http_port)]
    subprocess.run([*train, str(grpc_port), str(metrics_port)], check=True, timeout=600)
    proc = Proc("mlserver", [str(Path(venv) / "bin" / "mlserver"), "start", str(root)], root / "mlserver.log").start()
    try:
        ready = ["/v2/models/risk/versions/v1/ready", "/v2/models/risk/versions/v2/ready"]
        others = ["risk-columns", "risk-derived", "risk-derived-columns"]
        _wait_models_ready(http_port, [*ready, *(f"/v2/models/{m}/ready" for m in others)], proc)
        yield MLServer(http_port, proc)
    finally:
        proc.stop()


def _service(server: MLServer, model: str, version: str | None = None) -> dict[str, Any]:
    return {"service": {"host": "127.0.0.1", "port": server.port, "path": server.infer_path(model, version)}}


def oip_registry(server: MLServer, redis: RedisServer) -> dict[str, Any]:
    # Both OIP members read by the combiner at predict_proba[1], the probability of class 1.
    probability = {"tensor": "predict_proba", "index": 1}
    blend = {
        "name": "risk-blend",
        "path": "/score/risk-blend",
        "members": [
            {"model": "risk", "output": probability, "timeout_ms": 5000},
            {"model": "risk-columns", "output": probability, "timeout_ms": 5000},
        ],
        "deadline_ms": 6000,
        "aggregation": {"method": "mean", "field": "probability"},
    }
    doc = demo_registry_doc(
        feature_store={"redis": {"url": redis.url}, "timeout_ms": 1000, "cache": {"ttl_seconds": 0}},
        ensembles=[blend, derived_blend(probability)],
    )
    doc["broker"]["message_timeout_ms"] = 1500
    doc.pop("audit")  # the one-message hot path; audit on OIP routes is the JSON routes' machinery
    doc["entities"] = [
        *doc["entities"],
        {"name": "applicant", "join_key": "applicant_id", "store_key": "oip:{applicant_id}"},
    ]
    features = list(FEATURES)
    doc["models"] = [
        {
            "name": "risk",
            "protocol": "open_inference",
            "entity": "applicant",
            "features": features,
            "open_inference": {"feature_tensor": {"name": "features", "datatype": "FP32"}},
            "versions": [
                {"name": "v1", "weight": 50, "backend": _service(server, "risk", "v1")},
                {"name": "v2", "weight": 50, "backend": _service(server, "risk", "v2")},
            ],
        },
        {
            "name": "risk-columns",
            "protocol": "open_inference",
            "entity": "applicant",
            "features": features,
            "open_inference": {
                "entity_key": {"header": "x-applicant-id"},
                "feature_inputs": {"income": "FP64", "debt_ratio": "FP64", "age": "INT64", "tenure": "FP64"},
            },
            "versions": [{"name": "v1", "weight": 1, "backend": _service(server, "risk-columns")}],
        },
        {
            "name": "risk-by-parameter",
            "protocol": "open_inference",
            "entity": "applicant",
            "features": features,
            "open_inference": {
                "entity_key": {"parameter": "applicant_id"},
                "feature_tensor": {"name": "features", "datatype": "FP64"},
                "max_rows": 16,
            },
            "versions": [{"name": "v1", "weight": 1, "backend": _service(server, "risk", "v1")}],
        },
        *logic_models(server),
    ]
    return doc


def derived_blend(probability: dict[str, Any]) -> dict[str, Any]:
    """Both derived-feature models as ensemble members: each gets its derived values as tensors."""
    members = [
        {"model": m, "output": probability, "timeout_ms": 5000} for m in ("risk-derived", "risk-derived-columns")
    ]
    return {
        "name": "derived-blend",
        "path": "/score/derived-blend",
        "members": members,
        "deadline_ms": 6000,
        "aggregation": {"method": "mean", "field": "probability"},
    }


# Derived features as the models were trained on them (tests/mlserver_models.py, derived_columns).
DEBT = {"name": "debt", "expr": "features.debt_ratio * features.income"}
SENIOR = {"name": "senior", "expr": "features.age >= 60.0", "type": "bool"}
AGE_BAND = {"name": "age_band", "expr": "int(features.age / 10.0)", "type": "int"}
# A segment of the feature store: the rule on a fetched feature sends these applicants to v2.
RICH = 70.0
VIP = "a-7"


def logic_models(server: MLServer) -> list[dict[str, Any]]:
    """OIP models with derived features (each layout) and segment rules."""
    columns = {"income": "FP64", "debt_ratio": "FP64", "age": "INT64", "tenure": "FP64"}
    base = {"protocol": "open_inference", "entity": "applicant", "features": list(FEATURES)}
    tensor = {"feature_tensor": {"name": "features", "datatype": "FP64"}}
    return [
        {
            **base,
            "name": "risk-derived",
            "open_inference": tensor,
            "derived": [DEBT],
            "versions": [{"name": "v1", "weight": 1, "backend": _service(server, "risk-derived")}],
        },
        {
            **base,
            "name": "risk-derived-columns",
            "open_inference": {"entity_key": {"header": "x-applicant-id"}, "feature_inputs": columns},
            "derived": [DEBT, SENIOR, AGE_BAND],
            "versions": [{"name": "v1", "weight": 1, "backend": _service(server, "risk-derived-columns")}],
        },
        {
            # The same model, its derived column scaled by a request parameter: fails at run time on 0 or none.
            **base,
            "name": "risk-scaled",
            "open_inference": tensor,
            "derived": [{"name": "debt", "expr": "features.debt_ratio * features.income / body.parameters.scale"}],
            "versions": [{"name": "v1", "weight": 1, "backend": _service(server, "risk-derived")}],
        },
        {
            **base,
            "name": "risk-ruled",
            "open_inference": {"feature_tensor": {"name": "features", "datatype": "FP32"}},
            "rules": [
                {
                    "name": "partner",
                    "when": "has(body.parameters.channel) && body.parameters.channel == 'partner'",
                    "version": "v2",
                },
                {"name": "vip", "when": f"body.inputs.applicant_id == '{VIP}'", "version": "v2"},
                {"name": "rich", "when": f"features.income > {RICH}", "version": "v2"},
            ],
            # v2 is reached through the rules only.
            "versions": [
                {"name": "v1", "weight": 1, "backend": _service(server, "risk", "v1")},
                {"name": "v2", "weight": 0, "backend": _service(server, "risk", "v2")},
            ],
        },
    ]


@pytest.fixture(scope="module")
def oip_stack(
    mlserver: MLServer, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    redis_server.seed({f"oip:{key}": row for key, row in feature_rows().items()})
    doc = oip_registry(mlserver, redis_server)
    with run_stack(doc, tmp_path_factory.mktemp("oip-stack"), demo_models=False) as stack:
        yield stack


def client_of(url: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=url, network_timeout=30.0)


def broker_client(stack: Stack) -> triton.InferenceServerClient:
    return client_of(stack.base.removeprefix("http://"))


def key_input(keys: list[str]) -> triton.InferInput:
    tensor = triton.InferInput("applicant_id", [len(keys), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[k.encode()] for k in keys], dtype=object), binary_data=False)
    return tensor


def feature_tensor(keys: list[str], dtype: type[np.floating[Any]] = np.float32) -> triton.InferInput:
    """What the broker injects, written by hand from the same rows."""
    rows = feature_rows()
    values = np.array([[rows[k][f] for f in FEATURES] for k in keys], dtype=dtype)
    tensor = triton.InferInput("features", list(values.shape), "FP32" if dtype is np.float32 else "FP64")
    tensor.set_data_from_numpy(values, binary_data=False)
    return tensor


def column_inputs(key: str) -> list[triton.InferInput]:
    """One [1, 1] input per feature with its declared datatype, written by hand."""
    row = feature_rows()[key]
    inputs = []
    for name, datatype, dtype in (
        ("income", "FP64", np.float64),
        ("debt_ratio", "FP64", np.float64),
        ("age", "INT64", np.int64),
        ("tenure", "FP64", np.float64),
    ):
        tensor = triton.InferInput(name, [1, 1], datatype)
        tensor.set_data_from_numpy(np.array([[row[name]]], dtype=dtype), binary_data=False)
        inputs.append(tensor)
    return inputs


def probabilities() -> list[triton.InferRequestedOutput]:
    return [triton.InferRequestedOutput("predict_proba", binary_data=False)]


def test_health_and_server_metadata_are_the_brokers(oip_stack: Stack) -> None:
    """tritonclient's server calls reach the broker's own V2 health and metadata endpoints."""
    client = broker_client(oip_stack)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.get_server_metadata()["name"] == "model-broker"


def test_model_readiness_comes_from_the_backends(oip_stack: Stack) -> None:
    """A model is ready when a live version answers ready; an unknown version is not ready."""
    client = broker_client(oip_stack)
    assert client.is_model_ready("risk")
    assert client.is_model_ready("risk", "v1")
    assert client.is_model_ready("risk", "v2")
    assert not client.is_model_ready("risk", "v9")
    assert not client.is_model_ready("no-such-model")


def test_metadata_lists_what_the_client_sends(oip_stack: Stack, mlserver: MLServer) -> None:
    """The key tensor replaces the injected feature tensor in the inputs; outputs are MLServer's."""
    meta = broker_client(oip_stack).get_model_metadata("risk")
    direct = client_of(mlserver.url).get_model_metadata("risk", "v1")
    assert meta["name"] == "risk" and meta["versions"] == ["v1", "v2"]
    assert meta["inputs"] == [{"name": "applicant_id", "datatype": "BYTES", "shape": [-1, 1]}]
    assert meta["outputs"] == direct["outputs"]
    assert broker_client(oip_stack).get_model_metadata("risk", "v2")["versions"] == ["v2"]
    columns = broker_client(oip_stack).get_model_metadata("risk-columns")
    assert columns["inputs"] == []  # keyed by a header, every input injected


def test_predictions_equal_mlserver_with_features_by_hand(oip_stack: Stack, mlserver: MLServer) -> None:
    """For 60 entities, through the split: the answer equals the answering version called directly."""
    broker, direct = broker_client(oip_stack), client_of(mlserver.url)
    seen = set()
    for key in ENTITIES:
        result = broker.infer("risk", [key_input([key])], outputs=probabilities())
        version = result.get_response()["model_version"]
        seen.add(version)
        expected = direct.infer("risk", [feature_tensor([key])], model_version=version, outputs=probabilities())
        assert result.as_numpy("predict_proba").tolist() == expected.as_numpy("predict_proba").tolist(), key
    assert seen == {"v1", "v2"}  # 50/50 over 60 calls: both versions answered


def test_a_batch_of_16_rows_equals_mlserver(oip_stack: Stack, mlserver: MLServer) -> None:
    """16 keys in one tensor → 16 feature rows in one request, equal to the hand-written batch."""
    keys = ENTITIES[10:26]
    result = broker_client(oip_stack).infer("risk", [key_input(keys)], model_version="v2", outputs=probabilities())
    expected = client_of(mlserver.url).infer(
        "risk", [feature_tensor(keys)], model_version="v2", outputs=probabilities()
    )
    assert result.as_numpy("predict_proba").shape == (16, 2)
    assert result.as_numpy("predict_proba").tolist() == expected.as_numpy("predict_proba").tolist()


def test_model_version_pins_the_version(oip_stack: Stack) -> None:
    """`model_version=` reaches that version only, outside the weighted split."""
    client = broker_client(oip_stack)
    for version in ("v1", "v2") * 5:
        result = client.infer("risk", [key_input([ENTITIES[0]])], model_version=version, outputs=probabilities())
        assert result.get_response()["model_version"] == version


def test_key_in_a_header_and_one_input_per_feature(oip_stack: Stack, mlserver: MLServer) -> None:
    """A header carries the key; each feature becomes its own [1, 1] input of its declared datatype."""
    for key in ENTITIES[:10]:
        result = broker_client(oip_stack).infer(
            "risk-columns", [], outputs=probabilities(), headers={"x-applicant-id": key}
        )
        expected = client_of(mlserver.url).infer("risk-columns", column_inputs(key), outputs=probabilities())
        assert result.as_numpy("predict_proba").tolist() == expected.as_numpy("predict_proba").tolist(), key


def test_key_in_a_request_parameter(oip_stack: Stack, mlserver: MLServer) -> None:
    """tritonclient's `parameters=` carries the key; features go as one FP64 [1, 4] tensor."""
    key = ENTITIES[5]
    result = broker_client(oip_stack).infer(
        "risk-by-parameter", [], outputs=probabilities(), parameters={"applicant_id": key}
    )
    expected = client_of(mlserver.url).infer(
        "risk", [feature_tensor([key], np.float64)], model_version="v1", outputs=probabilities()
    )
    assert result.as_numpy("predict_proba").tolist() == expected.as_numpy("predict_proba").tolist()


def test_an_ensemble_of_oip_models_combines_a_named_output_element(oip_stack: Stack, mlserver: MLServer) -> None:
    """Each member gets tensors for its own layout; the mean is of predict_proba[1] from each answer."""
    direct = client_of(mlserver.url)
    for key in ENTITIES[:6]:
        reply = urllib.request.urlopen(
            urllib.request.Request(
                f"{oip_stack.base}/score/risk-blend",
                data=json.dumps({"applicant_id": key}).encode(),
                headers={"content-type": "application/json"},
            ),
            timeout=30,
        )
        answer = json.loads(reply.read())
        version = answer["results"]["risk"]["version"]
        tensor = direct.infer("risk", [feature_tensor([key])], model_version=version, outputs=probabilities())
        per_column = direct.infer("risk-columns", column_inputs(key), outputs=probabilities())
        expected = [tensor.as_numpy("predict_proba")[0][1], per_column.as_numpy("predict_proba")[0][1]]
        assert answer["combined"]["value"] == pytest.approx(sum(float(x) for x in expected) / 2, abs=1e-12), answer
        assert answer["combined"]["models"] == ["risk", "risk-columns"]


def test_tritonclient_prints_the_brokers_message(oip_stack: Stack) -> None:
    """An unknown entity is an exception whose text is the broker's code and message."""
    with pytest.raises(InferenceServerException) as caught:
        broker_client(oip_stack).infer("risk", [key_input(["a-nobody"])], outputs=probabilities())
    assert caught.value.status() == "404"
    assert "unknown_entity: no features are stored for applicant_id 'a-nobody'" in str(caught.value)


def test_binary_tensors_are_refused_clearly(oip_stack: Stack) -> None:
    """tritonclient's default binary encoding gets a 415 saying to send JSON tensors."""
    tensor = triton.InferInput("applicant_id", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[b"a-1"]], dtype=object))  # binary_data defaults to True
    with pytest.raises(InferenceServerException) as caught:
        broker_client(oip_stack).infer("risk", [tensor])
    assert caught.value.status() == "415"
    assert "binary tensor data" in str(caught.value) and "binary_data=False" in str(caught.value)


def _post(stack: Stack, path: str, body: bytes, headers: dict[str, str], method: str = "POST") -> tuple[int, Any, Any]:
    """A raw HTTP call: no content type unless given (http.client adds none)."""
    port = stack.doc["listener"]["port"]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body if method == "POST" else None, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.headers, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def _upstream_requests(stack: Stack) -> int:
    """Requests Envoy sent to any risk version, from its admin stats."""
    with urllib.request.urlopen(f"{stack.admin}/stats?filter=upstream_rq_total", timeout=10) as resp:
        lines = resp.read().decode().splitlines()
    return sum(int(line.rsplit(": ", 1)[1]) for line in lines if line.startswith("cluster.risk--"))


def _key_body(data: list[Any], shape: list[int], datatype: str = "BYTES") -> bytes:
    return json.dumps(
        {"inputs": [{"name": "applicant_id", "shape": shape, "datatype": datatype, "data": data}]}
    ).encode()


BAD_INPUTS = [
    pytest.param("/v2/models/risk/infer", b"{", {}, 400, "invalid_json", id="malformed-json-no-content-type"),
    pytest.param(
        "/v2/models/risk/infer",
        _key_body(["a-1"], [1, 1]),
        {"content-type": "text/plain"},
        415,
        "unsupported_media_type",
        id="other-content-type",
    ),
    pytest.param("/v2/models/risk/infer", b"", {}, 400, "invalid_json", id="empty-body"),
    pytest.param("/v2/models/risk/infer", b'{"inputs": []}', {}, 400, "invalid_tensor", id="no-inputs"),
    pytest.param("/v2/models/risk/infer", _key_body(["a-1"], [2, 1]), {}, 400, "invalid_tensor", id="wrong-shape"),
    pytest.param(
        "/v2/models/risk/infer", _key_body(["a-1"], [1, 1], "FP33"), {}, 400, "invalid_tensor", id="unknown-datatype"
    ),
    pytest.param(
        "/v2/models/risk/infer", _key_body([7], [1, 1], "INT64"), {}, 400, "invalid_entity_key", id="wrong-key-datatype"
    ),
    pytest.param(
        "/v2/models/risk/infer",
        _key_body(["a-1", "a-2"], [1, 2]),
        {},
        400,
        "invalid_entity_key",
        id="key-tensor-not-one-per-row",
    ),
    pytest.param(
        "/v2/models/risk/infer",
        json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}).encode(),
        {},
        400,
        "missing_entity_key",
        id="missing-entity-input",
    ),
    pytest.param(
        "/v2/models/risk/versions/v9/infer",
        _key_body(["a-1"], [1, 1]),
        {},
        404,
        "unknown_version",
        id="unknown-version",
    ),
    pytest.param("/v2/models/nope/infer", _key_body(["a-1"], [1, 1]), {}, 404, "unknown_model", id="unknown-model"),
    pytest.param(
        "/v2/models/risk/infer",
        _key_body(["a-1"], [1, 1]),
        {"inference-header-content-length": "60"},
        415,
        "unsupported_media_type",
        id="binary-extension",
    ),
    pytest.param(
        "/v2/models/risk-by-parameter/infer",
        b'{"inputs": [], "parameters": {"applicant_id": true}}',
        {},
        400,
        "invalid_entity_key",
        id="key-parameter-not-a-key",
    ),
    pytest.param(
        "/v2/models/risk/infer", _key_body(["a-nobody"], [1, 1]), {}, 404, "unknown_entity", id="unknown-entity"
    ),
    pytest.param(
        "/v2/models/risk/infer", _key_body([BAD_ENTITY], [1, 1]), {}, 502, "invalid_feature", id="unconvertible-feature"
    ),
    pytest.param(
        "/v2/models/risk-by-parameter/infer",
        b'{"inputs": [], "parameters": {}}',
        {},
        400,
        "missing_entity_key",
        id="missing-key-parameter",
    ),
]


@pytest.mark.parametrize(("path", "body", "headers", "status", "code"), BAD_INPUTS)
def test_bad_input_gets_an_oip_error_and_reaches_no_model(
    oip_stack: Stack, path: str, body: bytes, headers: dict[str, str], status: int, code: str
) -> None:
    """Each refusal is `{"error": "<code>: <message>"}` with its status and x-request-id; MLServer saw nothing."""
    before = _upstream_requests(oip_stack)
    got, reply_headers, reply = _post(oip_stack, path, body, headers)
    assert got == status, reply
    assert set(reply) == {"error"} and reply["error"].startswith(f"{code}: "), reply
    assert reply_headers.get("x-request-id"), reply_headers
    assert _upstream_requests(oip_stack) == before


def test_too_many_rows_is_refused(oip_stack: Stack) -> None:
    """More keys than the model's max_rows is a 413 naming the limit, before any store call."""
    keys = [f"a-{i}" for i in range(300)]
    status, _, reply = _post(oip_stack, "/v2/models/risk/infer", _key_body(keys, [300, 1]), {})
    assert status == 413 and reply["error"].startswith("too_many_rows: 300 rows; at most 256"), reply


def test_wrong_method_on_infer_is_an_oip_405(oip_stack: Stack) -> None:
    """GET on an infer path: 405 in OIP's shape, with the allowed method."""
    status, headers, reply = _post(oip_stack, "/v2/models/risk/infer", b"", {}, method="GET")
    assert status == 405 and headers["allow"] == "POST"
    assert reply["error"].startswith("method_not_allowed: "), reply


# Derived features and segment rules on OIP models (the models in `logic_models`).


def derived_row(key: str) -> dict[str, Any]:
    """One row's features and derived values, computed by hand as tests/mlserver_models.py trained them."""
    row = feature_rows()[key]
    return {
        **row,
        "debt": row["debt_ratio"] * row["income"],
        "senior": row["age"] >= 60,
        "age_band": row["age"] // 10,
    }


def derived_tensor(keys: list[str], debt: list[float] | None = None) -> triton.InferInput:
    """The [N, 5] FP64 tensor risk-derived was trained on; `debt` overrides the derived column."""
    rows = [derived_row(k) for k in keys]
    column = debt if debt is not None else [r["debt"] for r in rows]
    values = np.array([[*(r[f] for f in FEATURES), d] for r, d in zip(rows, column, strict=True)], dtype=np.float64)
    tensor = triton.InferInput("features", list(values.shape), "FP64")
    tensor.set_data_from_numpy(values, binary_data=False)
    return tensor


def test_a_derived_column_reaches_the_model_row_by_row(oip_stack: Stack, mlserver: MLServer) -> None:
    """16 keys in one request: each row's debt = debt_ratio x income is the fifth column, as the model was
    trained; the answer equals MLServer called with the column by hand, and differs without it."""
    keys = ENTITIES[20:36]
    result = broker_client(oip_stack).infer("risk-derived", [key_input(keys)], outputs=probabilities())
    direct = client_of(mlserver.url)
    expected = direct.infer("risk-derived", [derived_tensor(keys)], outputs=probabilities())
    got = result.as_numpy("predict_proba").tolist()
    assert got == expected.as_numpy("predict_proba").tolist()
    # The model reads the derived column: the same rows with debt 0 answer otherwise.
    zeroed = direct.infer("risk-derived", [derived_tensor(keys, [0.0] * len(keys))], outputs=probabilities())
    assert all(a != b for a, b in zip(got, zeroed.as_numpy("predict_proba").tolist(), strict=True))


def derived_inputs(key: str) -> list[triton.InferInput]:
    """risk-derived-columns' inputs by hand: the four features, then debt FP64, senior BOOL, age_band INT64."""
    row = derived_row(key)
    inputs = column_inputs(key)
    for name, datatype, dtype in (
        ("debt", "FP64", np.float64),
        ("senior", "BOOL", np.bool_),
        ("age_band", "INT64", np.int64),
    ):
        tensor = triton.InferInput(name, [1, 1], datatype)
        tensor.set_data_from_numpy(np.array([[row[name]]], dtype=dtype), binary_data=False)
        inputs.append(tensor)
    return inputs


def test_derived_inputs_reach_the_model_with_their_types_datatypes(oip_stack: Stack, mlserver: MLServer) -> None:
    """One [1, 1] input per derived feature (double → FP64, bool → BOOL, int → INT64), as MLServer's pandas
    codec reads DataFrame columns: the answers equal MLServer with the same inputs written by hand."""
    keys = [k for k in ENTITIES if feature_rows()[k]["age"] >= 60][:3] + [
        k for k in ENTITIES if feature_rows()[k]["age"] < 60
    ][:3]
    direct = client_of(mlserver.url)
    for key in keys:
        result = broker_client(oip_stack).infer(
            "risk-derived-columns", [], outputs=probabilities(), headers={"x-applicant-id": key}
        )
        expected = direct.infer("risk-derived-columns", derived_inputs(key), outputs=probabilities())
        assert result.as_numpy("predict_proba").tolist() == expected.as_numpy("predict_proba").tolist(), key


def test_a_derived_feature_reads_a_request_parameter(oip_stack: Stack, mlserver: MLServer) -> None:
    """`body.parameters.scale` is the request's parameter: scale 1 gives the trained column."""
    key = ENTITIES[3]
    result = broker_client(oip_stack).infer(
        "risk-scaled", [key_input([key])], outputs=probabilities(), parameters={"scale": 1.0}
    )
    expected = client_of(mlserver.url).infer("risk-derived", [derived_tensor([key])], outputs=probabilities())
    assert result.as_numpy("predict_proba").tolist() == expected.as_numpy("predict_proba").tolist()


def test_ensemble_members_get_their_derived_tensors(oip_stack: Stack, mlserver: MLServer) -> None:
    """An ensemble's OIP members derive over the one row they are sent: the mean equals MLServer's answers
    with the derived column and inputs written by hand."""
    direct = client_of(mlserver.url)
    for key in ENTITIES[40:44]:
        reply = urllib.request.urlopen(
            urllib.request.Request(
                f"{oip_stack.base}/score/derived-blend",
                data=json.dumps({"applicant_id": key}).encode(),
                headers={"content-type": "application/json"},
            ),
            timeout=30,
        )
        answer = json.loads(reply.read())
        tensor = direct.infer("risk-derived", [derived_tensor([key])], outputs=probabilities())
        columns = direct.infer("risk-derived-columns", derived_inputs(key), outputs=probabilities())
        expected = [tensor.as_numpy("predict_proba")[0][1], columns.as_numpy("predict_proba")[0][1]]
        assert answer["combined"]["value"] == pytest.approx(sum(float(x) for x in expected) / 2, abs=1e-12), answer


def _cluster_requests(stack: Stack, model: str) -> int:
    with urllib.request.urlopen(f"{stack.admin}/stats?filter=upstream_rq_total", timeout=10) as resp:
        lines = resp.read().decode().splitlines()
    return sum(int(line.rsplit(": ", 1)[1]) for line in lines if line.startswith(f"cluster.{model}--"))


@pytest.mark.parametrize(
    ("parameters", "cause"),
    [
        pytest.param(
            {"scale": 0}, "the result is inf (a division by zero?), not a finite number", id="division-by-zero"
        ),
        pytest.param({}, 'missing input: "scale"', id="missing-input"),
        pytest.param({"scale": "two"}, "type mismatch", id="type-mismatch"),
    ],
)
def test_a_derived_feature_failing_at_run_time_is_refused_in_oip_shape(
    oip_stack: Stack, parameters: dict[str, Any], cause: str
) -> None:
    """OIP models `reject` a feature they cannot have: 422 `missing_features: …` naming the entity, the
    feature, its expression and the cause, with x-request-id; the model is never called."""
    before = _cluster_requests(oip_stack, "risk-scaled")
    key = {"name": "applicant_id", "shape": [1, 1], "datatype": "BYTES", "data": [ENTITIES[3]]}
    body = json.dumps({"inputs": [key], "parameters": parameters}).encode()
    status, headers, reply = _post(oip_stack, "/v2/models/risk-scaled/infer", body, {})
    assert status == 422, reply
    assert set(reply) == {"error"} and headers.get("x-request-id"), (headers, reply)
    assert reply["error"].startswith(
        f"missing_features: applicant_id '{ENTITIES[3]}': features the model needs are missing: 'debt': "
        "`features.debt_ratio * features.income / body.parameters.scale`: "
    ), reply
    assert cause in reply["error"], reply
    assert _cluster_requests(oip_stack, "risk-scaled") == before


def _version_of(stack: Stack, keys: list[str], **kw: Any) -> str:
    result = broker_client(stack).infer("risk-ruled", [key_input(keys)], outputs=probabilities(), **kw)
    return str(result.get_response()["model_version"])


def test_rules_on_an_oip_request_pin_the_version(oip_stack: Stack, mlserver: MLServer) -> None:
    """A request parameter, an input tensor's value and a fetched feature each pin v2 (weight 0: reached
    through the rules only); no rule holding leaves Envoy's split (all v1). The pinned answer is v2's."""
    rows = feature_rows()
    plain = [k for k in ENTITIES if rows[k]["income"] <= RICH and k != VIP][:5]
    rich = [k for k in ENTITIES if rows[k]["income"] > RICH]
    assert len(rich) >= 2 and rows[VIP]["income"] <= RICH
    assert {_version_of(oip_stack, [k]) for k in plain} == {"v1"}
    assert {_version_of(oip_stack, [k], parameters={"channel": "partner"}) for k in plain} == {"v2"}
    assert {_version_of(oip_stack, [k], parameters={"channel": "direct"}) for k in plain} == {"v1"}
    assert _version_of(oip_stack, [VIP]) == "v2"
    assert {_version_of(oip_stack, [k]) for k in rich} == {"v2"}
    # The pinned request reaches v2 with its features: the answer is v2's for those features.
    result = broker_client(oip_stack).infer(
        "risk-ruled", [key_input(plain[:1])], outputs=probabilities(), parameters={"channel": "partner"}
    )
    expected = client_of(mlserver.url).infer(
        "risk", [feature_tensor(plain[:1])], model_version="v2", outputs=probabilities()
    )
    assert result.as_numpy("predict_proba").tolist() == expected.as_numpy("predict_proba").tolist()


def test_a_batch_is_pinned_when_every_row_is_in_the_segment(oip_stack: Stack) -> None:
    """One request goes to one version: all rows rich → v2; one row outside the segment → the split."""
    rows = feature_rows()
    rich = [k for k in ENTITIES if rows[k]["income"] > RICH]
    plain = [k for k in ENTITIES if rows[k]["income"] <= RICH and k != VIP]
    assert _version_of(oip_stack, rich) == "v2"
    assert _version_of(oip_stack, [*rich, plain[0]]) == "v1"


def _vip_matches(stack: Stack) -> int:
    """model_broker_rules_total for risk-ruled's `vip` rule, matched, from the broker's metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.doc['metrics']['port']}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = re.search(r'model_broker_rules_total\{model="risk-ruled",outcome="matched",rule="vip"\} ([0-9.]+)', text)
    return int(float(found.group(1))) if found else 0


def test_a_named_version_is_served_and_the_rules_stay_out(oip_stack: Stack) -> None:
    """`…/versions/v1/infer` names its version: v1 answers, and no rule is evaluated (none counted)."""
    before = _vip_matches(oip_stack)
    result = broker_client(oip_stack).infer(
        "risk-ruled", [key_input([VIP])], model_version="v1", outputs=probabilities()
    )
    assert result.get_response()["model_version"] == "v1"
    assert _vip_matches(oip_stack) == before
    assert _version_of(oip_stack, [VIP]) == "v2"  # through the split the rule holds, and is counted
    assert _vip_matches(oip_stack) == before + 1


def test_check_refuses_a_json_body_field_on_an_oip_model(oip_stack: Stack, tmp_path: Path) -> None:
    """`model-broker check` names the model, the rule and what an OIP `body` holds instead."""
    doc = json.loads(json.dumps(oip_stack.doc))
    ruled = next(i for i, m in enumerate(doc["models"]) if m["name"] == "risk-ruled")
    doc["models"][ruled]["rules"][0]["when"] = "body.channel == 'partner'"
    config = tmp_path / "registry.yaml"
    config.write_text(json.dumps(doc))
    result = subprocess.run(
        [sys.executable, "-m", "extproc.cli", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert (
        f"models[{ruled}].rules[0].when: risk-ruled: rule 'partner' `body.channel == 'partner'`: reads body.channel; "
        "on an open_inference model `body` holds `inputs` (this row's value of each input tensor: "
        "body.inputs.<tensor>) and `parameters` (the request's: body.parameters.<name>)"
    ) in result.stderr
