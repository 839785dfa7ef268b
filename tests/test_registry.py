"""Registry validation: every problem reported, each at its field path."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from extproc.registry import RegistryInvalid, parse_registry

BASE: dict[str, Any] = {
    "feature_store": {"embedded": {"path": "f.json"}},
    "entities": [{"name": "customer", "join_key": "customer_id"}],
    "models": [
        {
            "name": "credit-risk",
            "path": "/v1/models/credit-risk/predict",
            "entity": "customer",
            "features": ["income"],
            "versions": [
                {"name": "v1", "weight": 80, "backend": {"service": {"host": "a", "port": 80}}},
                {"name": "v2", "weight": 20, "features": ["late"], "backend": {"service": {"host": "b", "port": 80}}},
            ],
        }
    ],
}


def with_change(path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node: Any = doc
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    node[int(last) if last.isdigit() else last] = value
    return doc


def problems(doc: Any) -> list[str]:
    with pytest.raises(RegistryInvalid) as caught:
        parse_registry(doc)
    return [str(p) for p in caught.value.problems]


def test_valid_registry_loads_with_defaults() -> None:
    """A minimal registry gets the documented defaults (fail-closed, `features` key, 1 MiB body)."""
    reg = parse_registry(BASE)
    model = reg.models[0]
    assert model.failure_policy == "fail_closed"
    assert model.inject_as == "features"
    assert reg.limits.max_body_bytes == 1024 * 1024


def test_required_features_are_the_union_over_live_versions() -> None:
    """A version with weight 0 takes no traffic, so its extra features are not fetched."""
    assert parse_registry(BASE).models[0].required_features == ("income", "late")
    drained = with_change("models.0.versions.1.weight", 0)
    assert parse_registry(drained).models[0].required_features == ("income",)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("models.0.versions.0.weight", -1, "models[0].versions[0].weight: Input should be greater than or equal to 0"),
        ("models.0.versions.0.weight", "lots", "models[0].versions[0].weight: Input should be a valid integer"),
        ("models.0.entity", "account", "models[0].entity: unknown entity 'account' (known: customer)"),
        ("models.0.path", "no-slash", "models[0].path: String should match pattern"),
        ("models.0.path", "/healthz", "models[0].path: '/healthz' is reserved for the broker"),
        ("models.0.name", "Credit_Risk", "models[0].name: String should match pattern"),
        ("models.0.failure_policy", "maybe", "models[0].failure_policy: Input should be 'fail_closed' or 'fail_open'"),
        ("models.0.versions.0.backend", {}, "models[0].versions[0].backend: Value error, declare exactly one of"),
        ("models.0.versions.0.colour", "red", "models[0].versions[0].colour: Extra inputs are not permitted"),
        ("feature_store", {"redis": {"url": "http://x"}}, "feature_store.redis.url: String should match pattern"),
        ("entities.0.store_key", "cust:{id}", "entities[0]: Value error, store_key must contain '{customer_id}'"),
        ("models.0.versions", [], "models[0].versions: declare at least one version"),
    ],
    ids=[
        "negative-weight",
        "weight-not-int",
        "unknown-entity",
        "path-no-slash",
        "reserved-path",
        "bad-model-name",
        "bad-policy",
        "no-backend",
        "unknown-key",
        "redis-url-scheme",
        "store-key-template",
        "no-versions",
    ],
)
def test_problem_names_the_field(path: str, value: Any, expected: str) -> None:
    """Each mistake is reported at the field path a platform engineer would look at."""
    found = problems(with_change(path, value))
    assert any(p.startswith(expected) for p in found), found


def test_all_weights_zero_is_refused() -> None:
    """A model no version can serve is a registry error, not a runtime 503."""
    doc = with_change("models.0.versions.0.weight", 0)
    doc["models"][0]["versions"][1]["weight"] = 0
    assert problems(doc) == ["models[0].versions: at least one version needs a weight above 0"]


def test_every_problem_is_listed_at_once() -> None:
    """`check` lists everything wrong, not just the first thing."""
    doc = with_change("models.0.versions.0.weight", -5)
    doc["models"][0]["versions"][1]["name"] = "V2!"
    assert len(problems(doc)) == 2


def test_cross_reference_problems() -> None:
    """Duplicate names and paths, colliding ports and a timeout budget Envoy would cut short."""
    doc = copy.deepcopy(BASE)
    doc["models"].append(copy.deepcopy(doc["models"][0]))
    doc["models"][0]["versions"][1]["name"] = "v1"
    doc["admin"] = {"port": 8080}
    doc["broker"] = {"message_timeout_ms": 40}
    found = problems(doc)
    assert "models[1].name: duplicate name 'credit-risk'" in found
    assert "models[1].path: '/v1/models/credit-risk/predict' is already the path of models[0]" in found
    assert "models[0].versions[1].name: duplicate version 'v1'" in found
    assert "admin.port: port 8080 is also listener.port" in found
    assert any(p.startswith("broker.message_timeout_ms: must exceed feature_store.timeout_ms") for p in found)


@pytest.mark.parametrize("doc", [None, [], "text"], ids=["empty", "list", "scalar"])
def test_not_a_mapping(doc: Any) -> None:
    """An empty or non-mapping file gets one clear message."""
    assert problems(doc) == ["the registry must be a YAML mapping"]


def with_ensemble(**changes: Any) -> dict[str, Any]:
    """BASE plus a second model and a valid two-member ensemble, with `changes` applied to the ensemble."""
    doc = copy.deepcopy(BASE)
    fraud = copy.deepcopy(doc["models"][0])
    fraud.update(name="fraud", path="/v1/models/fraud/predict")
    doc["models"].append(fraud)
    ensemble = {
        "name": "underwriting",
        "path": "/v1/ensembles/underwriting/predict",
        "deadline_ms": 1000,
        "members": [{"model": "credit-risk", "timeout_ms": 500}, {"model": "fraud", "timeout_ms": 800}],
    }
    ensemble.update(changes)
    doc["ensembles"] = [ensemble]
    return doc


def test_valid_ensemble_defaults_to_all_members_and_all_results() -> None:
    """Without min_success every member must answer; without aggregation nothing is combined."""
    ensemble = parse_registry(with_ensemble()).ensembles[0]
    assert ensemble.required_successes == 2
    assert ensemble.aggregation.method == "all"


ENSEMBLE_PROBLEMS: list[tuple[str, dict[str, Any], str]] = [
    (
        "unknown-member",
        {"members": [{"model": "credit-risk"}, {"model": "fraudd"}]},
        "ensembles[0].members[1].model: unknown model 'fraudd' (models: credit-risk, fraud)",
    ),
    (
        "ensemble-as-member",
        {"members": [{"model": "underwriting"}]},
        "ensembles[0].members[0].model: 'underwriting' is an ensemble; members must be models",
    ),
    (
        "duplicate-member",
        {"members": [{"model": "fraud"}, {"model": "fraud"}]},
        "ensembles[0].members[1].model: 'fraud' is already a member",
    ),
    ("no-members", {"members": []}, "ensembles[0].members: Tuple should have at least 1 item"),
    (
        "path-of-a-model",
        {"path": "/v1/models/fraud/predict"},
        "ensembles[0].path: '/v1/models/fraud/predict' is already the path of models[1]",
    ),
    ("reserved-path", {"path": "/models"}, "ensembles[0].path: '/models' is reserved for the broker"),
    (
        "deadline-shorter-than-member",
        {"deadline_ms": 600},
        "ensembles[0].deadline_ms: 600 ms is shorter than members[1].timeout_ms (800 ms)",
    ),
    ("min-success-too-high", {"min_success": 3}, "ensembles[0].min_success: 3 exceeds the 2 member(s) declared"),
    ("min-success-zero", {"min_success": 0}, "ensembles[0].min_success: Input should be greater than or equal to 1"),
    (
        "combiner-without-field",
        {"aggregation": {"method": "mean"}},
        "ensembles[0].aggregation: Value error, 'field' is required for mean",
    ),
    (
        "unknown-combiner",
        {"aggregation": {"method": "median", "field": "score"}},
        "ensembles[0].aggregation.method: Input should be 'all', 'mean'",
    ),
    ("bad-weight", {"members": [{"model": "fraud", "weight": 0}]}, "ensembles[0].members[0].weight: Input should be"),
]


@pytest.mark.parametrize(("case", "changes", "expected"), ENSEMBLE_PROBLEMS, ids=[e[0] for e in ENSEMBLE_PROBLEMS])
def test_ensemble_problem_names_the_field(case: str, changes: dict[str, Any], expected: str) -> None:
    """Each ensemble mistake is reported at its field path, with what to fix."""
    found = problems(with_ensemble(**changes))
    assert any(p.startswith(expected) for p in found), found


def test_ensemble_members_share_one_entity_and_egress_stays_on_loopback() -> None:
    """Members of two entities would need two store calls; an egress listener off loopback skips the broker."""
    doc = with_ensemble()
    doc["entities"].append({"name": "account", "join_key": "account_id"})
    doc["models"][1]["entity"] = "account"
    doc["egress"] = {"address": "0.0.0.0", "port": 8081}
    found = problems(doc)
    assert any(p.startswith("ensembles[0].members[1].model: entity 'account' differs from 'customer'") for p in found)
    assert "egress.address: '0.0.0.0' is not a loopback address" in found


def test_egress_port_must_be_free_of_other_listeners() -> None:
    """The egress listener cannot share a port with the public listener."""
    doc = with_ensemble()
    doc["egress"] = {"port": 8080}
    assert "egress.port: port 8080 is also listener.port" in problems(doc)
