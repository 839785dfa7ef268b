"""The Open Inference Protocol's pure pieces: registry checks, tensors, infer requests, metadata."""

from __future__ import annotations

import copy
import json
from typing import Any

import orjson
import pytest

from extproc.core.oip import (
    OipPlan,
    client_metadata,
    convert,
    error_json,
    feature_tensors,
    forward_body,
    output_element,
    read_infer_request,
    tensor_problem,
)
from extproc.core.oip.infer import _converted
from extproc.envoy import AUTHZ_FILTER, route_configuration
from extproc.errors import BrokerError, ErrorCode
from extproc.registry import RegistryInvalid, parse_registry

PLAN = OipPlan(model="risk", features=("income", "age"), key_input="id", tensor=("features", "FP32"), max_rows=4)
COLUMNS = OipPlan(
    model="risk", features=("income", "age"), key_header="x-id", inputs=(("income", "FP64"), ("age", "INT64"))
)


def _model(**overrides: Any) -> dict[str, Any]:
    model = {
        "name": "risk",
        "protocol": "open_inference",
        "entity": "applicant",
        "features": ["income", "age"],
        "open_inference": {"feature_tensor": {"name": "features"}},
        "versions": [
            {"name": "v1", "weight": 1, "backend": {"service": {"host": "m", "port": 1, "path": "/v2/models/r/infer"}}}
        ],
    }
    model.update(overrides)
    return model


def _problems(model: dict[str, Any], ensembles: list[dict[str, Any]] | None = None) -> list[str]:
    doc = {
        "feature_store": {"embedded": {"path": "f.json"}},
        "entities": [{"name": "applicant", "join_key": "applicant_id"}],
        "models": [model],
        "ensembles": ensembles or [],
    }
    try:
        parse_registry(doc)
    except RegistryInvalid as exc:
        return [str(p) for p in exc.problems]
    return []


def test_an_oip_model_is_served_at_its_v2_path() -> None:
    """Without a path, an OIP model's path is /v2/models/<name>/infer."""
    doc = {
        "feature_store": {"embedded": {"path": "f.json"}},
        "entities": [{"name": "applicant", "join_key": "applicant_id"}],
        "models": [_model()],
    }
    assert parse_registry(doc).models[0].path == "/v2/models/risk/infer"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"path": "/score"}, "models[0].path: an open_inference model is served at /v2/models/risk/infer"),
        ({"open_inference": {}}, "models[0].open_inference: declare 'feature_tensor' or 'feature_inputs'"),
        (
            {"open_inference": {"feature_inputs": {"income": "FP64"}}},
            "models[0].open_inference.feature_inputs: must name every feature of the model",
        ),
        ({"unknown_entity": "forward"}, "models[0].unknown_entity: a tensor has no row for an unknown entity"),
        (
            {"versions": [{"name": "v1", "weight": 1, "backend": {"service": {"host": "m", "port": 1}}}]},
            "models[0].versions[0].backend.service.path: the server's infer path",
        ),
        (
            {"open_inference": {"feature_tensor": {"name": "applicant_id"}}},
            "models[0].open_inference.entity_key.input: 'applicant_id' is also a feature tensor's name",
        ),
        ({"protocol": "json", "path": "/v2/score"}, "models[0].path: paths under /v2/ are the Open Inference"),
        ({"missing_features": "null"}, "models[0].missing_features: a tensor has no null"),
        (
            {"open_inference": {"feature_tensor": {"name": "f"}, "entity_key": {"input": "a", "header": "x-a"}}},
            "declare exactly one of 'input', 'parameter' or 'header'",
        ),
    ],
    ids=[
        "own-path",
        "no-layout",
        "inputs-not-features",
        "forward-unknown",
        "backend-path",
        "key-clash",
        "json-v2",
        "missing-null",
        "two-key-sources",
    ],
)
def test_registry_refuses_what_oip_cannot_serve(overrides: dict[str, Any], expected: str) -> None:
    """Each OIP misconfiguration is a check error at its field path."""
    problems = _problems(_model(**overrides))
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    ("value", "datatype", "ok", "converted"),
    [
        (52000, "FP32", True, 52000.0),
        ("52000", "FP32", False, None),
        (1e39, "FP32", False, None),
        (1e39, "FP64", True, 1e39),
        (float("nan"), "FP64", False, None),
        (float("inf"), "FP64", False, None),
        (10**400, "FP64", False, None),
        (True, "FP64", False, None),
        (3.0, "INT64", True, 3),
        (3.5, "INT64", False, None),
        (300, "UINT8", False, None),
        (-1, "UINT64", False, None),
        (True, "BOOL", True, True),
        (1, "BOOL", False, None),
        (7, "BYTES", True, "7"),
        (None, "BYTES", False, None),
    ],
)
def test_feature_values_convert_only_when_the_datatype_holds_them(
    value: Any, datatype: str, ok: bool, converted: Any
) -> None:
    """A value that does not fit its declared datatype is refused, never coerced to zero."""
    assert convert(value, datatype) == (ok, converted)


@pytest.mark.parametrize(
    ("tensor", "problem"),
    [
        ({"name": "a", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3, 4]]}, ""),
        ({"name": "a", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3]}, "has 3 elements but shape [2, 2]"),
        ({"name": "a", "shape": [-1], "datatype": "FP32", "data": []}, "a list of non-negative integers"),
        ({"name": "a", "shape": [1], "datatype": "F32", "data": [1]}, "datatype 'F32'"),
        ({"name": "a", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}, "binary data"),
        ({"shape": [1], "datatype": "FP32", "data": [1]}, "needs a non-empty string 'name'"),
    ],
    ids=["nested-ok", "count", "negative-dim", "datatype", "binary", "no-name"],
)
def test_tensor_problems(tensor: dict[str, Any], problem: str) -> None:
    """Input tensors are checked for name, datatype, shape and element count (flat or nested)."""
    found = tensor_problem(tensor, "inputs[0]")
    assert (problem in found and bool(found)) if problem else found == ""


def _request(plan: OipPlan, doc: Any, content_type: str = "", header: str = "") -> Any:
    return read_infer_request(plan, orjson.dumps(doc), content_type=content_type, header_key=header, max_depth=32)


def test_keys_come_one_per_row_from_the_key_tensor() -> None:
    """A [N, 1] BYTES key tensor gives N keys, in order; no content type counts as JSON."""
    doc = {"inputs": [{"name": "id", "shape": [3, 1], "datatype": "BYTES", "data": ["a", "b", "a"]}]}
    assert _request(PLAN, doc).keys == ("a", "b", "a")


@pytest.mark.parametrize(
    ("doc", "content_type", "code"),
    [
        ({"inputs": [{"name": "id", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}, "text/csv", "unsupported"),
        ({"inputs": [{"name": "id", "shape": [5, 1], "datatype": "BYTES", "data": list("abcde")}]}, "", "too_many"),
        ({"inputs": [{"name": "id", "shape": [1], "datatype": "BYTES", "data": [""]}]}, "", "invalid_entity_key"),
        ({"inputs": [{"name": "id", "shape": [1], "datatype": "BYTES", "data": [3]}]}, "", "invalid_entity_key"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [3]}]}, "", "missing_entity_key"),
        ({"inputs": "id"}, "", "invalid_tensor"),
        ({"inputs": [{"name": "id", "shape": [1], "datatype": "BYTES", "data": ["a"]}] * 2}, "", "invalid_tensor"),
        ({"inputs": [], "parameters": []}, "", "invalid_tensor"),
    ],
    ids=[
        "content-type",
        "rows",
        "empty-key",
        "number-in-bytes",
        "no-key-input",
        "inputs-not-list",
        "twice",
        "parameters-not-object",
    ],
)
def test_bad_requests_are_errors_with_codes(doc: Any, content_type: str, code: str) -> None:
    """Every malformed request is a BrokerError whose code says what is wrong."""
    found = _request(PLAN, doc, content_type)
    assert isinstance(found, BrokerError) and found.code.value.startswith(code), found


def test_a_header_key_is_one_row() -> None:
    """With the key in a header, the client may send no input tensors at all."""
    assert _request(COLUMNS, {"inputs": []}, header="c-7").keys == ("c-7",)
    missing = _request(COLUMNS, {"inputs": []})
    assert isinstance(missing, BrokerError) and missing.code is ErrorCode.MISSING_ENTITY_KEY


def test_features_become_one_tensor_in_declared_order() -> None:
    """[N, k] row-major, columns in the model's feature order, values as the datatype holds them."""
    rows = [{"age": 30, "income": 50.5}, {"age": 41, "income": 12}]
    assert feature_tensors(PLAN, ["a", "b"], rows, "id") == [
        {"name": "features", "shape": [2, 2], "datatype": "FP32", "data": [50.5, 30.0, 12.0, 41.0]}
    ]


def test_features_become_one_input_each() -> None:
    """Per-feature layout: one [N, 1] input per feature with its own datatype."""
    tensors = feature_tensors(COLUMNS, ["a"], [{"income": 50, "age": 30}], "id")
    assert tensors == [
        {"name": "income", "shape": [1, 1], "datatype": "FP64", "data": [50.0]},
        {"name": "age", "shape": [1, 1], "datatype": "INT64", "data": [30]},
    ]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"income": "lots", "age": 3}, "feature 'income' of id 'a' is \"lots\", which is not a valid FP32"),
        ({"income": 1.0, "age": None}, "feature 'age' of id 'a' has no value"),
    ],
)
def test_an_unconvertible_feature_is_named(row: dict[str, Any], message: str) -> None:
    """A stored value the tensor cannot carry is a 502 naming the feature and the entity."""
    found = feature_tensors(PLAN, ["a"], [row], "id")
    assert isinstance(found, BrokerError) and found.status == 502 and found.message == message


def test_the_forwarded_body_drops_the_key_and_replaces_spoofed_features() -> None:
    """The model gets the client's other tensors and the broker's features, never the client's copy."""
    doc = {
        "id": "r1",
        "inputs": [
            {"name": "id", "shape": [1], "datatype": "BYTES", "data": ["a"]},
            {"name": "features", "shape": [1, 2], "datatype": "FP32", "data": [0, 0]},
            {"name": "amount", "shape": [1], "datatype": "FP32", "data": [9]},
        ],
        "outputs": [{"name": "predict_proba"}],
    }
    request = _request(PLAN, copy.deepcopy(doc))
    injected = feature_tensors(PLAN, ["a"], [{"income": 1, "age": 2}], "id")
    assert not isinstance(injected, BrokerError)
    sent = orjson.loads(forward_body(PLAN, request, injected))
    assert [t["name"] for t in sent["inputs"]] == ["amount", "features"]
    assert sent["inputs"][1]["data"] == [1.0, 2.0]
    assert sent["id"] == "r1" and sent["outputs"] == doc["outputs"]


def test_metadata_shows_the_key_and_hides_the_features() -> None:
    """The backend's feature tensor is replaced by the key tensor the client sends."""
    backend = {"name": "r", "platform": "sklearn", "inputs": [{"name": "features"}, {"name": "amount"}], "outputs": []}
    meta = client_metadata(PLAN, backend, ["v1"])
    assert meta["inputs"] == [{"name": "id", "datatype": "BYTES", "shape": [-1, 1]}, {"name": "amount"}]
    assert meta["name"] == "risk" and meta["versions"] == ["v1"] and meta["platform"] == "sklearn"


def test_oip_errors_are_one_string() -> None:
    """`{"error": "<code>: <message>"}`, which tritonclient prints as is."""
    error = BrokerError(ErrorCode.UNKNOWN_VERSION, "risk has no version v9")
    assert error_json(error) == {"error": "unknown_version: risk has no version v9"}


def _ensemble_problems(member: dict[str, Any], model: dict[str, Any]) -> list[str]:
    blend = {"name": "blend", "path": "/blend", "members": [member], "aggregation": {"method": "mean", "field": "p"}}
    return _problems(model, [blend])


def test_an_oip_member_says_which_output_element_is_combined() -> None:
    """An OIP member of a combining ensemble needs `output`; a JSON member may not declare one."""
    assert _ensemble_problems({"model": "risk", "output": {"tensor": "predict_proba", "index": 1}}, _model()) == []
    missing = _ensemble_problems({"model": "risk"}, _model())
    assert any("members[0].output: an open_inference member needs 'output'" in p for p in missing), missing
    json_model = _model(protocol="json", path="/score", open_inference=None)
    wrong = _ensemble_problems({"model": "risk", "output": {"tensor": "p"}}, json_model)
    assert any("members[0].output: only for open_inference members" in p for p in wrong), wrong


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ({"outputs": [{"name": "predict_proba", "data": [0.2, 0.8]}]}, 0.8),
        ({"outputs": [{"name": "predict_proba", "data": [[0.2, 0.8]]}]}, 0.8),
        ({"outputs": [{"name": "predict_proba", "data": [0.2]}]}, None),
        ({"outputs": [{"name": "predict", "data": [1, 0]}]}, None),
        ({"error": "x"}, None),
    ],
    ids=["flat", "nested", "too-short", "other-output", "no-outputs"],
)
def test_the_combiner_reads_one_output_element(answer: dict[str, Any], expected: Any) -> None:
    """Element 1 of `predict_proba`, row-major; None when the answer has no such element."""
    assert output_element(answer, "predict_proba", 1) == expected


def test_metadata_and_readiness_follow_the_models_allow_list() -> None:
    """With consumers, an OIP model's GET routes admit exactly the consumers that may call the model."""
    doc = {
        "feature_store": {"embedded": {"path": "f.json"}},
        "entities": [{"name": "applicant", "join_key": "applicant_id"}],
        "models": [_model()],
        "consumers": [
            {"name": "alice", "api_keys": ["sha256:" + "a" * 64], "models": ["risk"]},
            {"name": "bob", "api_keys": ["sha256:" + "b" * 64], "models": []},
        ],
    }
    routes = {r.name: r for r in route_configuration(parse_registry(doc)).virtual_hosts[0].routes}
    for name in ("oip-metadata:risk", "oip-ready:risk/v1"):
        authz = json.dumps(routes[name].typed_per_filter_config[AUTHZ_FILTER].to_dict())
        assert "alice" in authz and "bob" not in authz, name


def test_a_feature_past_64_bits_is_a_coded_error_naming_it() -> None:
    """Found by the property test: a stored integer orjson cannot write must not crash the error message."""
    found = _converted(-(2**63) - 1, "INT64", "age", "a-0", "applicant_id")
    assert isinstance(found, BrokerError) and found.code is ErrorCode.INVALID_FEATURE
    assert "-9223372036854775809" in found.message
