"""Derived features and segment rules on Open Inference Protocol models: check, tensors, rows, rules."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.core.logic import ModelLogic
from extproc.core.oip import (
    DATATYPES,
    OipLogicOutcome,
    OipPlan,
    apply_oip_logic,
    client_metadata,
    compile_plan,
    feature_tensors,
    forward_body,
    read_infer_request,
    row_bodies,
)
from extproc.core.routing import compile_routes, named_version_routes
from extproc.envoy import route_configuration
from extproc.errors import BrokerError, ErrorCode
from extproc.registry import Registry, RegistryInvalid, parse_registry
from tests.test_hardening import dumps_like_a_client, json_values, scalars

SERVICE = {"service": {"host": "m", "port": 1, "path": "/v2/models/r/infer"}}
DERIVED = [
    {"name": "debt", "expr": "features.debt_ratio * features.income"},
    {"name": "senior", "expr": "features.age >= 60.0", "type": "bool"},
]


def _model(**overrides: Any) -> dict[str, Any]:
    model = {
        "name": "risk",
        "protocol": "open_inference",
        "entity": "applicant",
        "features": ["income", "debt_ratio", "age"],
        "open_inference": {"feature_tensor": {"name": "features", "datatype": "FP64"}},
        "versions": [{"name": "v1", "weight": 1, "backend": SERVICE}, {"name": "v2", "weight": 0, "backend": SERVICE}],
    }
    model.update(overrides)
    return model


def _doc(model: dict[str, Any]) -> dict[str, Any]:
    return {
        "feature_store": {"embedded": {"path": "f.json"}},
        "entities": [{"name": "applicant", "join_key": "applicant_id"}],
        "models": [model],
    }


def _problems(model: dict[str, Any]) -> list[str]:
    try:
        parse_registry(_doc(model))
    except RegistryInvalid as exc:
        return [str(p) for p in exc.problems]
    return []


def _registry(**overrides: Any) -> Registry:
    return parse_registry(_doc(_model(**overrides)))


COLUMNS = {"feature_inputs": {"income": "FP64", "debt_ratio": "FP64", "age": "INT64"}}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        pytest.param(
            {"rules": [{"when": "body.country == 'DE'", "version": "v2"}]},
            "models[0].rules[0].when: risk: rule 'rule-0' `body.country == 'DE'`: reads body.country; on an "
            "open_inference model `body` holds `inputs` (this row's value of each input tensor: "
            "body.inputs.<tensor>) and `parameters` (the request's: body.parameters.<name>)",
            id="json-field-on-oip",
        ),
        pytest.param(
            {"derived": [{"name": "n", "expr": "double(size(body))"}]},
            "models[0].derived[0].expr: risk: derived 'n' `double(size(body))`: reads the whole body",
            id="whole-body",
        ),
        pytest.param(
            {"rules": [{"when": "body.inputs.features[0] > 1.0", "version": "v2"}]},
            "body.inputs.features is a tensor the broker injects; read features.features",
            id="reads-an-injected-tensor",
        ),
        pytest.param(
            {"derived": [{"name": "d", "expr": "features.incme / 2.0"}]},
            "models[0].derived[0].expr: risk: derived 'd' `features.incme / 2.0`: unknown feature 'incme'",
            id="unknown-feature",
        ),
        pytest.param(
            {"derived": [{"name": "band", "expr": "features.age > 60.0 ? 'old' : 'young'", "type": "string"}]},
            "models[0].derived[0].type: derived 'band' is a string, but it would be a column of the FP64 tensor "
            "'features'; declare 'feature_inputs' to send it as its own input",
            id="string-column",
        ),
        pytest.param(
            {
                "derived": DERIVED[1:],
                "open_inference": {"feature_inputs": {**COLUMNS["feature_inputs"], "senior": "FP32"}},
            },
            "models[0].open_inference.feature_inputs.senior: a bool derived feature cannot fill a FP32 tensor",
            id="datatype-the-type-cannot-fill",
        ),
        pytest.param(
            {"open_inference": {"feature_inputs": {**COLUMNS["feature_inputs"], "other": "FP32"}}},
            "may name its derived features (nothing else)",
            id="feature-inputs-name-something-else",
        ),
        pytest.param(
            {"derived": [{"name": "applicant_id", "expr": "1.0"}]},
            "models[0].derived[0].name: 'applicant_id' is also the entity key tensor's name",
            id="derived-named-like-the-key",
        ),
        pytest.param(
            {"rules": [{"when": "body.parameters.channel == 'x'", "version": "v9"}]},
            "models[0].rules[0].version: 'v9' is not a version of risk",
            id="unknown-version",
        ),
    ],
)
def test_check_refuses_what_an_oip_request_cannot_give(overrides: dict[str, Any], expected: str) -> None:
    """Each bad expression or layout on an OIP model is a check problem naming the model and the expression."""
    problems = _problems(_model(**overrides))
    assert any(expected in p for p in problems), problems


def test_check_accepts_inputs_parameters_and_derived_inputs() -> None:
    """`body.inputs.<tensor>`, `body.parameters.<name>` and derived features in either layout pass check."""
    rules = [
        {
            "name": "partner",
            "when": "has(body.parameters.channel) && body.parameters.channel == 'partner'",
            "version": "v2",
        },
        {"name": "vip", "when": "body.inputs.applicant_id == 'a-7'", "version": "v2"},
    ]
    assert _problems(_model(derived=DERIVED[:1], rules=rules)) == []
    assert _problems(_model(derived=DERIVED, rules=rules, open_inference=COLUMNS)) == []


def test_derived_features_become_columns_or_inputs_with_the_types_datatype() -> None:
    """Tensor layout: extra columns after the stored ones. Input layout: one [N, 1] input each, FP64/BOOL."""
    tensor = compile_plan(_registry(derived=DERIVED[:1]).models[0], "applicant_id")
    rows = [
        {"income": 10.0, "debt_ratio": 0.5, "age": 30, "debt": 5.0},
        {"income": 20, "debt_ratio": 0.25, "age": 70, "debt": 5.0},
    ]
    assert feature_tensors(tensor, ["a", "b"], rows, "applicant_id") == [
        {"name": "features", "shape": [2, 4], "datatype": "FP64", "data": [10.0, 0.5, 30.0, 5.0, 20.0, 0.25, 70.0, 5.0]}
    ]
    columns = compile_plan(_registry(derived=DERIVED, open_inference=COLUMNS).models[0], "applicant_id")
    assert columns.derived_inputs == (("debt", "FP64"), ("senior", "BOOL"))
    assert columns.injected == {"income", "debt_ratio", "age", "debt", "senior"}
    rows = [{**rows[0], "senior": False}, {**rows[1], "senior": True}]
    tensors = feature_tensors(columns, ["a", "b"], rows, "applicant_id")
    assert not isinstance(tensors, BrokerError)
    assert [(t["name"], t["datatype"], t["shape"], t["data"]) for t in tensors][-2:] == [
        ("debt", "FP64", [2, 1], [5.0, 5.0]),
        ("senior", "BOOL", [2, 1], [False, True]),
    ]
    declared = {**COLUMNS["feature_inputs"], "debt": "FP32"}
    assert compile_plan(
        _registry(derived=DERIVED[:1], open_inference={"feature_inputs": declared}).models[0], "applicant_id"
    ).derived_inputs == (("debt", "FP32"),)


def test_metadata_hides_derived_inputs_and_a_client_cannot_spoof_them() -> None:
    """A derived input is the broker's: hidden from the metadata, and a client tensor of its name is replaced."""
    plan = compile_plan(_registry(derived=DERIVED, open_inference=COLUMNS).models[0], "applicant_id")
    backend = {"inputs": [{"name": n} for n in ("income", "debt_ratio", "age", "debt", "senior", "extra")]}
    assert [i["name"] for i in client_metadata(plan, backend, ["v1"])["inputs"]] == ["applicant_id", "extra"]
    spoof = {"name": "debt", "shape": [1, 1], "datatype": "FP64", "data": [0.0]}
    key = {"name": "applicant_id", "shape": [1, 1], "datatype": "BYTES", "data": ["a"]}
    request = read_infer_request(
        plan, orjson.dumps({"inputs": [key, spoof]}), content_type="", header_key="", max_depth=16
    )
    assert not isinstance(request, BrokerError)
    mine = {"name": "debt", "shape": [1, 1], "datatype": "FP64", "data": [5.0]}
    assert orjson.loads(forward_body(plan, request, [mine]))["inputs"] == [mine]


@pytest.mark.parametrize(
    ("tensor", "rows", "expected"),
    [
        pytest.param({"shape": [2, 1], "data": ["a", "b"]}, 2, ["a", "b"], id="n-by-1"),
        pytest.param({"shape": [2], "data": [1, 2]}, 2, [1, 2], id="n"),
        pytest.param({"shape": [2, 2], "data": [[1, 2], [3, 4]]}, 2, [[1, 2], [3, 4]], id="n-by-k-nested"),
        pytest.param({"shape": [2, 2], "data": [1, 2, 3, 4]}, 2, [[1, 2], [3, 4]], id="n-by-k-flat"),
        pytest.param({"shape": [3], "data": [1, 2, 3]}, 1, [[1, 2, 3]], id="not-per-row"),
    ],
)
def test_each_row_sees_its_part_of_each_input(tensor: dict[str, Any], rows: int, expected: list[Any]) -> None:
    """`body.inputs.<t>` is row i's element ([N], [N, 1]) or elements ([N, k]); other tensors are whole."""
    doc = {"inputs": [{"name": "t", "datatype": "FP64", **tensor}], "parameters": {"p": 1}}
    assert row_bodies(doc, rows, None) == [{"inputs": {"t": v}, "parameters": {"p": 1}} for v in expected]
    assert row_bodies(doc, rows, ("other",))[0] == {"inputs": {}, "parameters": {"p": 1}}


def _logic(**overrides: Any) -> ModelLogic:
    logic = compile_routes(_registry(**overrides))["risk"].logic
    assert logic is not None
    return logic


ROWS = [{"income": 10.0, "debt_ratio": 0.5, "age": 30}, {"income": 100.0, "debt_ratio": 0.1, "age": 70}]
KEYS = ["a-1", "a-2"]


def _apply(
    logic: ModelLogic, doc: dict[str, Any], rows: list[dict[str, Any]] = ROWS, **kw: Any
) -> OipLogicOutcome | BrokerError:
    options: dict[str, Any] = {"started_at": 0.0, "degraded": "", "withdrawn": frozenset(), "sticky": "u"} | kw
    return apply_oip_logic(logic, doc, KEYS[: len(rows)], rows, join_key="applicant_id", **options)


def _keys_doc(*keys: str, **parameters: Any) -> dict[str, Any]:
    key = {"name": "applicant_id", "shape": [len(keys), 1], "datatype": "BYTES", "data": list(keys)}
    return {"inputs": [key], "parameters": parameters}


def test_each_row_gets_its_own_derived_value() -> None:
    """Derived from each row's features and inputs; the audit keeps them by entity key."""
    derived = [*DERIVED, {"name": "vip", "expr": "body.inputs.applicant_id == 'a-2'", "type": "bool"}]
    outcome = _apply(_logic(derived=derived, open_inference=COLUMNS), _keys_doc(*KEYS))
    assert isinstance(outcome, OipLogicOutcome)
    assert [(r["debt"], r["senior"], r["vip"]) for r in outcome.rows] == [(5.0, False, False), (10.0, True, True)]
    assert outcome.derived == {
        "a-1": {"debt": 5.0, "senior": False, "vip": False},
        "a-2": {"debt": 10.0, "senior": True, "vip": True},
    }


@pytest.mark.parametrize(
    ("parameters", "cause"),
    [
        pytest.param(
            {"divisor": 0}, "the result is inf (a division by zero?), not a finite number", id="division-by-zero"
        ),
        pytest.param({}, 'missing input: "divisor"', id="missing-parameter"),
        pytest.param({"divisor": "two"}, "type mismatch", id="type-mismatch"),
    ],
)
def test_a_failing_row_is_refused_naming_entity_feature_and_expression(parameters: dict[str, Any], cause: str) -> None:
    """OIP models reject (check insists): 422 missing_features naming the row's entity, the feature and the cause."""
    logic = _logic(derived=[{"name": "ratio", "expr": "features.income / body.parameters.divisor"}])
    outcome = _apply(logic, _keys_doc(*KEYS, **parameters))
    assert isinstance(outcome, BrokerError) and outcome.code is ErrorCode.MISSING_FEATURES
    assert outcome.message.startswith(
        "applicant_id 'a-1': features the model needs are missing: "
        "'ratio': `features.income / body.parameters.divisor`: "
    ), outcome.message
    assert cause in outcome.message


RULES = [
    {
        "name": "partner",
        "when": "has(body.parameters.channel) && body.parameters.channel == 'partner'",
        "version": "v2",
    },
    {"name": "rich", "when": "features.income > 50.0", "version": "v2"},
]


@pytest.mark.parametrize(
    ("doc", "rows", "rule", "version"),
    [
        pytest.param(_keys_doc("a-1", channel="partner"), ROWS[:1], "partner", "v2", id="request-parameter"),
        pytest.param(_keys_doc("a-2"), ROWS[1:], "rich", "v2", id="fetched-feature"),
        pytest.param(_keys_doc("a-1", "a-2"), ROWS, None, None, id="batch-not-all-rows"),
        pytest.param(_keys_doc("a-2", "a-2"), [ROWS[1], ROWS[1]], "rich", "v2", id="batch-all-rows"),
        pytest.param(_keys_doc("a-1", channel="direct"), ROWS[:1], None, None, id="no-match"),
    ],
)
def test_a_rule_holds_for_the_request_when_it_holds_for_every_row(
    doc: dict[str, Any], rows: list[dict[str, Any]], rule: str | None, version: str | None
) -> None:
    """One request goes to one version: the first rule holding on every row pins it."""
    outcome = _apply(_logic(rules=RULES), doc, rows)
    assert isinstance(outcome, OipLogicOutcome) and outcome.decision is not None
    assert (outcome.decision.rule, outcome.decision.version) == (rule, version)


def test_a_rule_naming_a_withdrawn_version_leaves_the_split_to_envoy() -> None:
    """A rolled-back version is never pinned: the outcome is `withdrawn`, no version."""
    outcome = _apply(_logic(rules=RULES), _keys_doc("a-1", channel="partner"), ROWS[:1], withdrawn=frozenset({"v2"}))
    assert isinstance(outcome, OipLogicOutcome) and outcome.decision is not None
    assert (outcome.decision.outcome, outcome.decision.version) == ("withdrawn", None)


def test_a_rule_error_on_one_row_counts_as_not_holding_and_names_the_row() -> None:
    """A condition that cannot be evaluated on some row does not hold; the error says which row."""
    rules = [{"name": "odd", "when": "body.inputs.score > 1.0", "version": "v2"}]
    doc = _keys_doc(*KEYS)
    doc["inputs"].append({"name": "score", "shape": [2, 1], "datatype": "BYTES", "data": ["2", "x"]})
    outcome = _apply(_logic(rules=rules), doc)
    assert isinstance(outcome, OipLogicOutcome) and outcome.decision is not None
    assert outcome.decision.outcome == "no_match"
    assert outcome.decision.errors[0][0] == "odd" and "row 0: " in outcome.decision.errors[0][1]


def test_the_store_down_under_fail_open_keeps_failures_for_the_audit() -> None:
    """Degraded (no stored rows): derived failures are recorded, not refused; body-only rules still decide."""
    logic = _logic(derived=DERIVED[:1], rules=RULES, failure_policy="fail_open")
    outcome = _apply(logic, _keys_doc("a-1", channel="partner"), [{}], degraded="feature_store_unavailable")
    assert isinstance(outcome, OipLogicOutcome) and outcome.decision is not None
    assert outcome.decision.version == "v2" and "debt" in outcome.derived_errors["a-1"]


def test_plan_keeps_features_for_an_inputs_layout_that_names_derived_ones() -> None:
    """feature_inputs may name derived features: the stored inputs stay the model's features."""
    declared = {**COLUMNS["feature_inputs"], "debt": "FP32"}
    plan = compile_plan(
        _registry(derived=DERIVED[:1], open_inference={"feature_inputs": declared}).models[0], "applicant_id"
    )
    assert isinstance(plan, OipPlan) and plan.inputs == tuple(COLUMNS["feature_inputs"].items())


# Hostile OIP requests against expressions that index, loop, divide and convert whatever they get.
HOSTILE_DERIVED = [
    {"name": "ratio", "expr": "features.income / body.parameters.p"},
    {"name": "first", "expr": "has(body.inputs.x) ? double(body.inputs.x[0]) * 2.0 : 0.0"},
    {"name": "count", "expr": "size(body.inputs)", "type": "int"},
]
HOSTILE_RULES = [
    {"name": "x", "when": "body.inputs.x == 'DE' || body.inputs.y.exists(v, v > 1.0)", "version": "v2"},
    {"name": "p", "when": "body.parameters.p > 0.5 && features.income > 1.0", "split": {"v1": 1, "v2": 1}},
]
HOSTILE = compile_plan(
    _registry(derived=HOSTILE_DERIVED, rules=HOSTILE_RULES, open_inference=COLUMNS).models[0], "applicant_id"
)
HOSTILE_LOGIC = _logic(derived=HOSTILE_DERIVED, rules=HOSTILE_RULES, open_inference=COLUMNS)


@st.composite
def oip_requests(draw: st.DrawFn) -> dict[str, Any]:
    """Requests with a valid key tensor of N rows and other tensors of any shape, datatype and values."""
    rows = draw(st.integers(1, 3))
    key = {"name": "applicant_id", "shape": [rows, 1], "datatype": "BYTES", "data": [f"a-{i}" for i in range(rows)]}
    tensors = [key]
    for name in draw(st.lists(st.sampled_from(["x", "y", "debt", "income"]), unique=True, max_size=3)):
        shape = draw(st.sampled_from([[rows], [rows, 1], [rows, 2], [3], []]))
        count = 1 if not shape else rows * (shape[1] if len(shape) > 1 else 1) if shape != [3] else 3
        data = draw(st.lists(scalars, min_size=count, max_size=count))
        tensors.append({"name": name, "shape": shape, "datatype": draw(st.sampled_from(DATATYPES)), "data": data})
    parameters = {"p": draw(st.floats(0.5, 2) | json_values), **draw(st.dictionaries(st.just("q"), json_values))}
    return {"inputs": tensors, "parameters": parameters}


# Rows as a store holds them, some values replaced by anything.
stored = st.builds(
    lambda row, spoiled: {**row, **spoiled},
    st.fixed_dictionaries({"income": st.floats(1, 1e6), "debt_ratio": st.floats(0, 1), "age": st.integers(18, 99)}),
    st.dictionaries(
        st.sampled_from(["income", "debt_ratio", "age"]),
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        max_size=1,
    ),
)


@settings(max_examples=500, deadline=None)
@given(oip_requests(), stored, st.sampled_from(["", "feature_store_unavailable"]))
def test_no_oip_request_crashes_the_logic(doc: dict[str, Any], features: dict[str, Any], degraded: str) -> None:
    """Any tensors, parameters and stored values: the tensors to send, or a coded error; never an exception."""
    request = read_infer_request(HOSTILE, dumps_like_a_client(doc), content_type="", header_key="", max_depth=32)
    if isinstance(request, BrokerError):
        return
    keys = list(request.keys)
    outcome = apply_oip_logic(
        HOSTILE_LOGIC,
        request.doc,
        keys,
        [features] * len(keys),
        join_key="applicant_id",
        started_at=0.0,
        degraded=degraded,
        withdrawn=frozenset(),
        sticky=None,
    )
    if isinstance(outcome, BrokerError):
        assert outcome.code is ErrorCode.MISSING_FEATURES and not degraded
        return
    assert outcome.decision is not None and outcome.decision.version in {None, "v1", "v2"}
    tensors = feature_tensors(HOSTILE, keys, outcome.rows, "applicant_id")
    if not isinstance(tensors, BrokerError):
        assert orjson.loads(forward_body(HOSTILE, request, tensors))["inputs"]


def test_a_named_version_route_keeps_derived_features_and_drops_the_rules() -> None:
    """`…/versions/<v>/infer` has a route name of its own; the broker's plan for it derives but never pins."""
    registry = _registry(derived=DERIVED[:1], rules=RULES)
    names = {r.name for r in route_configuration(registry).virtual_hosts[0].routes}
    assert {"oip-infer:risk/v1", "oip-infer:risk/v2"} <= names
    named = named_version_routes(registry, compile_routes(registry))
    assert set(named) == {"oip-infer:risk/v1", "oip-infer:risk/v2"}
    logic = named["oip-infer:risk/v1"].logic
    assert logic is not None and logic.rules == () and [d.name for d in logic.derived] == ["debt"]
    assert named["oip-infer:risk/v1"].model == "risk"
