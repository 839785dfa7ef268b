"""Hostile input to derived features and rules, property-based: nothing a client sends or a store holds crashes
the worker. Two layers: the pure logic (many examples) and the ext_proc server through a real gRPC client."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import HttpBody, ProcessingRequest
from google.protobuf.struct_pb2 import Struct
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc import wire
from extproc.core.features import CachedFeatureStore, EmbeddedFeatureStore
from extproc.core.logic import LogicOutcome, ModelLogic, apply_logic, compile_logic
from extproc.core.processor import BrokerProcessor
from extproc.errors import BrokerError, ErrorCode
from extproc.expressions import Expression, compile_expression
from extproc.registry import parse_registry
from tests.conftest import DEMO_DIR, demo_registry_doc
from tests.test_hardening import ServerThread, dumps_like_a_client, json_values

# Expressions that divide, index, compare, loop and convert whatever they are given.
DERIVED = [
    {"name": "ratio", "expr": "body.amount / features.income"},
    {"name": "scaled", "expr": "int(features.debt_ratio * 100.0)", "type": "int"},
    {"name": "label", "expr": "string(body.v) + features.segment", "type": "string"},
    {"name": "any_big", "expr": "body.v.exists(x, x > 3.0)", "type": "bool"},
    {"name": "nested", "expr": "body.v.a[0].b == 'x' || size(body) > 3", "type": "bool"},
]
RULES = [
    {"name": "country", "when": "body.country == 'DE' && body.v.startsWith('a')", "version": "v2"},
    {"name": "ratio", "when": "features.ratio > 0.5", "split": {"v1": 1, "v2": 1}},
    {"name": "when", "when": "now.getHours() < 25 && body.v in [1.0, 'x', null]", "version": "v1"},
]
FEATURE_NAMES = ("income", "debt_ratio", "tenure_months", "segment")


def registry_doc(policy: str) -> dict[str, Any]:
    doc = demo_registry_doc(ensembles=[])  # ensembles need an egress client; the body path is the same
    doc["audit"] = None
    doc["limits"]["max_body_bytes"] = 4096
    doc["models"][0].update(features=list(FEATURE_NAMES), derived=DERIVED, rules=RULES, missing_features=policy)
    return doc


PLANS: dict[str, ModelLogic] = {}
for _policy in ("reject", "forward_degraded", "null"):
    _plan = compile_logic(parse_registry(registry_doc(_policy)).models[0])
    assert _plan is not None
    PLANS[_policy] = _plan

# Stored values as the stores decode them (orjson): 64-bit integers, finite floats, anything else a string.
int64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
feature_values = st.dictionaries(
    st.sampled_from(FEATURE_NAMES),
    st.none() | st.booleans() | int64 | st.floats(allow_nan=False) | st.text(max_size=20) | st.lists(int64, max_size=3),
)
bodies = st.dictionaries(st.sampled_from(["amount", "v", "country", "customer_id", "w"]), json_values, max_size=5)


@settings(max_examples=800, deadline=None)
@given(bodies, feature_values, st.sampled_from(sorted(PLANS)), st.sampled_from(["", "unknown_entity"]))
def test_logic_never_raises(body: dict[str, Any], features: dict[str, Any], policy: str, degraded: str) -> None:
    """Any body and any stored values: an outcome in the declared types, or the policy's 422; never an exception."""
    outcome = apply_logic(
        PLANS[policy], body, features, started_at=1.7e9, degraded=degraded, withdrawn=frozenset(), sticky=None
    )
    if isinstance(outcome, BrokerError):
        assert policy == "reject" and not degraded and outcome.code is ErrorCode.MISSING_FEATURES
        return
    assert isinstance(outcome, LogicOutcome)
    types = {"ratio": float, "scaled": int, "label": str, "any_big": bool, "nested": bool}
    for name, value in outcome.derived.items():
        assert type(value) is types[name], (name, value)
    orjson.dumps(outcome.features)  # what is injected is always JSON: no NaN, no infinity
    assert outcome.decision is not None and outcome.decision.version in {None, "v1", "v2"}


@settings(max_examples=600, deadline=None)
@given(st.text(max_size=80))
def test_any_expression_text_compiles_or_is_refused(source: str) -> None:
    """Arbitrary expression text is a program or a problem message, never an exception."""
    compiled = compile_expression(source, FEATURE_NAMES, "bool")
    assert isinstance(compiled, Expression | str)


@pytest.fixture(scope="module")
def sync_stub() -> Iterator[ext_proc_grpc.ExternalProcessorStub]:
    registry = parse_registry(registry_doc("reject"))
    store = CachedFeatureStore(
        EmbeddedFeatureStore.from_file(DEMO_DIR / "features.json"), ttl_seconds=1, max_entries=100, timeout_s=1
    )
    with (
        ServerThread(BrokerProcessor(registry, store)) as server,
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        yield ext_proc_grpc.ExternalProcessorStub(channel)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(json_values, json_values, st.sampled_from(["c-1", "c-4", "c-12"]))
def test_ext_proc_answers_every_input_to_the_expressions(
    sync_stub: ext_proc_grpc.ExternalProcessorStub, amount: Any, v: Any, customer: str
) -> None:
    """Through the gRPC server: an enriched body (possibly pinned), or a 4xx/422 with the error shape."""
    body = b'{"customer_id": "%s", "amount": %s, "v": %s}' % (
        customer.encode(),
        dumps_like_a_client(amount),
        dumps_like_a_client(v),
    )
    attrs = Struct()
    attrs.update(
        {wire.ATTR_ROUTE_NAME: "credit-risk", wire.ATTR_REQUEST_ID: "r-1", wire.ATTR_CONTENT_TYPE: "application/json"}
    )
    request = ProcessingRequest(
        request_body=HttpBody(body=body, end_of_stream=True), attributes={wire.ATTRIBUTES_FILTER_KEY: attrs}
    )
    (response,) = list(sync_stub.Process(iter([request]), timeout=10))
    if response.HasField("immediate_response"):
        immediate = response.immediate_response
        assert immediate.status.code in {400, 413, 422}, immediate
        error = orjson.loads(immediate.body)["error"]
        assert set(error) == {"code", "message", "request_id"} and error["request_id"] == "r-1"
    else:
        common = response.request_body.response
        enriched = orjson.loads(common.body_mutation.body)
        assert isinstance(enriched, dict) and isinstance(enriched["features"], dict)
        pin = response.dynamic_metadata.fields[wire.METADATA_NAMESPACE].struct_value.fields.get(wire.META_PIN)
        # A pinned version always comes with the route-cache clear that makes Envoy honour it.
        assert pin is None or (pin.string_value in {"v1", "v2"} and common.clear_route_cache)
