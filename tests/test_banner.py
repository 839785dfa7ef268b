"""What `up` and `demo` print: example requests with keys the store has, commands the user's shell can run."""

from __future__ import annotations

import copy
import shlex
import time
from pathlib import Path
from typing import Any

import pytest

from extproc.process.banner import (
    Example,
    banner,
    curl,
    entity_key_of,
    even_split,
    example_requests,
    glob_of,
    program,
    sample_key,
)
from extproc.process.launcher import example_rows, free_port
from extproc.registry import Entity, Registry, parse_registry
from tests.conftest import RedisServer, demo_registry_doc, demo_rows

BASE = "http://127.0.0.1:8080"


def registry(**overrides: Any) -> Registry:
    return parse_registry(demo_registry_doc(**overrides))


def test_program_is_the_bare_name_only_when_the_shell_finds_this_very_one(tmp_path: Path) -> None:
    """Found on PATH as itself → `model-broker`; elsewhere or another one → the absolute path of this one."""
    bin_dir = tmp_path / "my venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "model-broker").touch()
    python = str(bin_dir / "python")
    other = tmp_path / "other" / "model-broker"
    other.parent.mkdir()
    other.touch()
    assert program(lambda _: str(bin_dir / "model-broker"), python) == "model-broker"
    assert program(lambda _: None, python) == shlex.quote(str(bin_dir / "model-broker"))
    assert program(lambda _: str(other), python) == shlex.quote(str(bin_dir / "model-broker"))
    assert program(lambda _: None, str(tmp_path / "python")) == f"{tmp_path / 'python'} -m extproc.cli"


@pytest.mark.parametrize(
    ("template", "store_key", "key"),
    [
        ("customer:{customer_id}", "customer:c-1", "c-1"),
        ("customer:{customer_id}", "merchant:m-1", None),
        ("customer:{customer_id}", "customer:", None),
        ("{customer_id}@cust", "c-9@cust", "c-9"),
        ("{customer_id}@cust", "c-9@other", None),
        (None, "customer:42", "42"),
    ],
    ids=["prefix", "other-entity", "empty-key", "suffix", "wrong-suffix", "default-template"],
)
def test_entity_key_is_read_back_from_a_store_key(template: str | None, store_key: str, key: str | None) -> None:
    """The store key template is undone to find the key a client would send."""
    entity = Entity(name="customer", join_key="customer_id", store_key=template)
    assert entity_key_of(store_key, entity) == key


def test_sample_key_has_every_feature_asked_for() -> None:
    """A row missing a feature is passed over, so the example never meets `unknown_entity`."""
    entity = Entity(name="customer", join_key="customer_id", store_key="customer:{customer_id}")
    rows = {"customer:a": {"income": 1}, "merchant:x": {"income": 1, "debt": 2}, "customer:b": {"income": 1, "debt": 2}}
    assert sample_key(rows, entity, {"income", "debt"}) == "b"
    assert sample_key(rows, entity, {"tenure"}) is None


@pytest.mark.parametrize(
    ("versions", "split"),
    [(["v1", "v2"], "v1=50 v2=50"), (["a", "b", "c"], "a=34 b=33 c=33"), (["only"], "only=100")],
    ids=["two", "three", "one"],
)
def test_even_split_adds_up_to_100(versions: list[str], split: str) -> None:
    """The printed `weights set` is a valid split: every version named, whole numbers."""
    assert even_split(versions) == split


def printed(text: str) -> list[str]:
    """The indented command lines of a banner."""
    return [
        line.strip() for line in text.splitlines() if line.startswith("  ") and not line.startswith(("  GET", "  POST"))
    ]


def test_demo_banner_has_a_working_request_for_every_model_and_ensemble(tmp_path: Path) -> None:
    """Each model and the ensemble get a curl with a customer the demo store has, plus weights and audit lines."""
    reg = registry()
    text = banner(
        reg,
        BASE,
        str(tmp_path / "reg.yaml"),
        rows=demo_rows(),
        prog="/v/bin/model-broker",
        example_fields={"amount": 1200},
    )
    lines = printed(text)
    curls = [line for line in lines if line.startswith("curl ")]
    assert [shlex.split(c)[3] for c in curls] == [BASE + m.path for m in reg.models] + [
        BASE + e.path for e in reg.ensembles
    ]
    assert all(shlex.split(c)[-1] == '{"customer_id": "c-1", "amount": 1200}' for c in curls), curls
    assert "Try (each answers 200):" in text
    admin = f"--admin http://127.0.0.1:{reg.control_plane.admin_port}"
    assert f"/v/bin/model-broker weights set credit-risk v1=50 v2=50 {admin}" in lines
    assert f"/v/bin/model-broker weights show {admin}" in lines
    assert f"/v/bin/model-broker audit list --model credit-risk --since 1h --config {tmp_path / 'reg.yaml'}" in lines
    assert f"/v/bin/model-broker audit show <x-request-id> --config {tmp_path / 'reg.yaml'}" in lines


def test_relative_config_is_printed_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The audit lines work from any directory: the registry is named by its absolute path."""
    monkeypatch.chdir(tmp_path)
    text = banner(registry(), BASE, "reg.yaml", rows={}, prog="model-broker")
    assert f"--config {tmp_path / 'reg.yaml'}" in text and "--config reg.yaml" not in text


def test_store_without_rows_asks_for_a_key_instead_of_promising_200() -> None:
    """With Redis (no rows to sample) the example says to put in a key; it never claims to answer 200."""
    reg = registry(feature_store={"redis": {"url": "redis://127.0.0.1:6379/0"}})
    text = banner(reg, BASE, "/r.yaml", rows={}, prog="model-broker")
    assert "Try (put in an entity key your feature store has):" in text
    assert '"customer_id": "<a customer_id in your feature store>"' in text
    assert "each answers 200" not in text


def test_tls_consumers_and_bind_all_admin_are_printed_usably() -> None:
    """HTTPS examples take -k (the certificate names the public host), consumers get a key hint, and a
    control plane bound to 0.0.0.0 is reached at 127.0.0.1."""
    doc = demo_registry_doc()
    doc["control_plane"] = {**doc["control_plane"], "address": "0.0.0.0"}
    doc["consumers"] = [{"name": "app", "api_keys": ["sha256:" + "a" * 64], "models": ["*"]}]
    reg = parse_registry(copy.deepcopy(doc))
    text = banner(reg, "https://127.0.0.1:8443", "/r.yaml", rows=demo_rows(), prog="model-broker")
    assert "curl -s -k -i https://127.0.0.1:8443/v1/models/credit-risk/predict" in text
    assert "add -H 'x-api-key: <your key>'" in text
    assert f"--admin http://127.0.0.1:{reg.control_plane.admin_port}" in text


def test_every_model_gets_an_example_even_with_its_own_entity() -> None:
    """A second entity's model is sampled from its own keys."""
    doc = demo_registry_doc()
    doc["entities"].append({"name": "merchant", "join_key": "merchant_id"})
    merchant = copy.deepcopy(doc["models"][1]) | {
        "name": "shops",
        "path": "/v1/models/shops/predict",
        "entity": "merchant",
    }
    merchant["features"] = ["segment"]
    doc["models"].append(merchant)
    rows = demo_rows() | {"merchant:m-7": {"segment": "retail"}}
    examples = example_requests(parse_registry(doc), rows)
    assert Example("/v1/models/shops/predict", {"merchant_id": "m-7"}, (), known=True) in examples


def oip_model(entity_key: dict[str, Any] | None) -> dict[str, Any]:
    settings: dict[str, Any] = {"feature_tensor": {"name": "features"}}
    if entity_key is not None:
        settings["entity_key"] = entity_key
    backend = {"service": {"host": "127.0.0.1", "port": 1, "path": "/v2/models/risk/infer"}}
    return {
        "name": "risk",
        "protocol": "open_inference",
        "entity": "customer",
        "features": ["income"],
        "open_inference": settings,
        "versions": [{"name": "v1", "weight": 1, "backend": backend}],
    }


@pytest.mark.parametrize(
    ("entity_key", "body", "headers"),
    [
        (None, {"inputs": [{"name": "customer_id", "shape": [1], "datatype": "BYTES", "data": ["c-1"]}]}, ()),
        ({"parameter": "customer"}, {"inputs": [], "parameters": {"customer": "c-1"}}, ()),
        ({"header": "x-customer"}, {"inputs": []}, (("x-customer", "c-1"),)),
    ],
    ids=["input-tensor", "parameter", "header"],
)
def test_open_inference_examples_carry_the_key_where_the_model_reads_it(
    entity_key: dict[str, Any] | None, body: dict[str, Any], headers: tuple[tuple[str, str], ...]
) -> None:
    """An OIP model's example is an OIP request: the key as a tensor, a parameter or a header; no JSON extras."""
    doc = demo_registry_doc()
    doc["models"] = [oip_model(entity_key)]
    doc["ensembles"] = []
    (example,) = example_requests(parse_registry(doc), demo_rows(), {"amount": 1200})
    assert example == Example("/v2/models/risk/infer", body, headers, known=True)
    line = curl(BASE + example.path, example)
    assert all(f"-H '{name}: {value}'" in line for name, value in headers)


@pytest.mark.parametrize(
    ("template", "glob"),
    [("customer:{customer_id}", "customer:*"), ("c[1]*:{customer_id}?", "c\\[1\\]\\*:*\\?"), (None, "customer:*")],
    ids=["prefix", "glob-characters", "default-template"],
)
def test_scan_pattern_matches_only_the_entitys_keys(template: str | None, glob: str) -> None:
    """The SCAN pattern escapes the template's own glob characters."""
    assert glob_of(Entity(name="customer", join_key="customer_id", store_key=template)) == glob


def test_redis_examples_use_keys_the_store_has(redis_server: RedisServer) -> None:
    """With Redis, a short SCAN finds keys with every feature, so the printed curls answer 200 there too."""
    reg = registry(feature_store={"redis": {"url": redis_server.url}})
    rows = example_rows(reg)
    assert rows and all(key.startswith("customer:") for key in rows)
    examples = example_requests(reg, rows)
    assert examples and all(e.known for e in examples), examples
    assert all(f"customer:{e.body['customer_id']}" in demo_rows() for e in examples)


def test_redis_away_gives_placeholders_quickly() -> None:
    """Redis not answering: the banner asks for a key instead of waiting or failing."""
    reg = registry(feature_store={"redis": {"url": f"redis://127.0.0.1:{free_port()}/0"}})
    started = time.monotonic()
    assert example_rows(reg) == {}
    assert time.monotonic() - started < 10
