"""Registry validation: every problem reported, each at its field path."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.registry import RegistryInvalid, hash_api_key, load_registry, parse_registry

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
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
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
        ("models.0.path", "no-slash", "models[0].path: should be a URL path starting with '/', without spaces"),
        ("models.0.path", "/healthz", "models[0].path: '/healthz' is reserved for the broker"),
        ("models.0.name", "Credit_Risk", "models[0].name: should be a DNS label (1 to 63 lowercase letters"),
        ("models.0.failure_policy", "maybe", "models[0].failure_policy: Input should be 'fail_closed' or 'fail_open'"),
        ("models.0.versions.0.backend", {}, "models[0].versions[0].backend: Value error, declare exactly one of"),
        ("models.0.versions.0.colour", "red", "models[0].versions[0].colour: Extra inputs are not permitted"),
        ("feature_store", {"redis": {"url": "http://x"}}, "feature_store.redis.url: should be a redis://, rediss://"),
        ("entities.0.store_key", "cust:{id}", "entities[0]: Value error, store_key must contain '{customer_id}'"),
        ("models.0.versions", [], "models[0].versions: declare at least one version"),
        ("models.0.sticky", {"header": "x-broker-user"}, "models[0].sticky: Value error, 'x-broker-user' is reserved"),
        ("listener.request_headers_timeout_ms", 0, "listener.request_headers_timeout_ms: Input should be greater"),
        ("broker.max_in_flight", 0, "broker.max_in_flight: Input should be greater than or equal to 1"),
        ("overload.max_heap_bytes", 1024, "overload.max_heap_bytes: Input should be greater than or equal to"),
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
        "sticky-header-is-the-brokers",
        "no-header-timeout",
        "no-in-flight",
        "heap-too-small",
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


KEY_HASH = hash_api_key("a-key")


def with_consumers(*consumers: dict[str, Any], **top: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    doc["consumers"] = list(consumers)
    doc.update(top)
    return doc


CONSUMER_PROBLEMS: list[tuple[str, dict[str, Any], str]] = [
    (
        "unknown-model",
        with_consumers({"name": "a", "api_keys": [KEY_HASH], "models": ["fraud"]}),
        "consumers[0].models[0]: unknown model or ensemble 'fraud' (known: credit-risk, or '*')",
    ),
    (
        "duplicate-key-hash",
        with_consumers({"name": "a", "api_keys": [KEY_HASH]}, {"name": "b", "api_keys": [KEY_HASH]}),
        "consumers[1].api_keys[0]: the same key hash is already consumers[0].api_keys[0]",
    ),
    (
        "malformed-hash",
        with_consumers({"name": "a", "api_keys": ["sha256:ABC"]}),
        "consumers[0].api_keys[0]: should be 'sha256:' and 64 lowercase hex digits, as `model-broker hash-key` prints",
    ),
    (
        "plaintext-key",
        with_consumers({"name": "a", "api_keys": ["my-secret-key"]}),
        "consumers[0].api_keys[0]: should be 'sha256:' and 64 lowercase hex digits",
    ),
    ("no-credential", with_consumers({"name": "a", "models": ["*"]}), "consumers[0]: Value error, declare 'api_keys'"),
    (
        "two-jwks-sources",
        with_consumers({"name": "a", "jwt": {"issuer": "i", "jwks_file": "j", "jwks_uri": "https://x/j"}}),
        "consumers[0].jwt: Value error, declare exactly one of 'jwks_file' or 'jwks_uri'",
    ),
    (
        "same-issuer-and-subject",
        with_consumers(
            {"name": "a", "jwt": {"issuer": "i", "jwks_uri": "https://x/j"}},
            {"name": "b", "jwt": {"issuer": "i", "jwks_uri": "https://x/j"}},
        ),
        "consumers[1].jwt: a token could match both this consumer and consumers[0] (same issuer)",
    ),
    (
        "issuer-wide-and-subject",
        with_consumers(
            {"name": "a", "jwt": {"issuer": "i", "subject": "s", "jwks_uri": "https://x/j"}},
            {"name": "b", "jwt": {"issuer": "i", "jwks_uri": "https://x/j"}},
        ),
        "consumers[1].jwt: a token could match both this consumer and consumers[0] (same issuer)",
    ),
    (
        "duplicate-consumer",
        with_consumers({"name": "a", "api_keys": [KEY_HASH]}, {"name": "a", "api_keys": [hash_api_key("other")]}),
        "consumers[1].name: duplicate name 'a'",
    ),
    (
        "zero-rate",
        with_consumers({"name": "a", "api_keys": [KEY_HASH], "rate_limit": {"requests": 0}}),
        "consumers[0].rate_limit.requests: Input should be greater than or equal to 1",
    ),
    (
        "public-admin-without-admin",
        with_consumers({"name": "a", "api_keys": [KEY_HASH]}, admin={"port": 9901, "public_endpoints": True}),
        "admin.public_endpoints: no consumer has 'admin: true'",
    ),
    (
        "admin-not-loopback",
        with_consumers(admin={"address": "0.0.0.0", "port": 9901}),
        "admin.address: '0.0.0.0' is not loopback",
    ),
]


@pytest.mark.parametrize(("case", "doc", "expected"), CONSUMER_PROBLEMS, ids=[c[0] for c in CONSUMER_PROBLEMS])
def test_consumer_problems(case: str, doc: dict[str, Any], expected: str) -> None:
    """Consumer mistakes (names, keys, allow-lists, admin exposure) are reported at their field path."""
    found = problems(doc)
    assert any(p.startswith(expected) for p in found), (case, found)


def test_files_named_by_the_registry_must_exist(tmp_path: Path) -> None:
    """A missing JWKS or certificate file, or a JWKS that is not one, fails `check`, not Envoy's start."""
    (tmp_path / "not-jwks.json").write_text('{"keys": []}')
    doc = with_consumers(
        {"name": "a", "jwt": {"issuer": "i", "jwks_file": "missing.json"}},
        {"name": "b", "jwt": {"issuer": "j", "jwks_file": "not-jwks.json"}},
        listener={"port": 8080, "tls": {"certificate_chain": "cert.pem", "private_key": "key.pem"}},
    )
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(RegistryInvalid) as caught:
        load_registry(path)
    found = [str(p) for p in caught.value.problems]
    assert f"listener.tls.certificate_chain: no such file: {tmp_path / 'cert.pem'}" in found
    assert any(p.startswith("consumers[0].jwt.jwks_file: cannot read") for p in found)
    assert any(p.startswith("consumers[1].jwt.jwks_file:") and "not a JWKS" in p for p in found)


def test_one_issuer_serves_consumers_told_apart_by_subject() -> None:
    """Two consumers may share an issuer when each names its own subject."""
    doc = with_consumers(
        {"name": "a", "jwt": {"issuer": "i", "subject": "s1", "jwks_uri": "https://x/j"}},
        {"name": "b", "jwt": {"issuer": "i", "subject": "s2", "jwks_uri": "https://x/j"}},
    )
    assert [c.name for c in parse_registry(doc).consumers] == ["a", "b"]


def test_admin_endpoints_default_follows_open_mode() -> None:
    """/models is public while the registry is open, private once consumers exist, unless declared."""
    assert parse_registry(BASE).admin_endpoints_public
    secured = with_consumers({"name": "a", "api_keys": [KEY_HASH], "admin": True})
    assert not parse_registry(secured).admin_endpoints_public
    secured["admin"] = {"port": 9901, "public_endpoints": True}
    assert parse_registry(secured).admin_endpoints_public


def test_hash_api_key_is_prefixed_sha256() -> None:
    """The registry form names its algorithm and is hashlib's SHA-256 of the UTF-8 key."""
    assert hash_api_key("hello") == "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"


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
