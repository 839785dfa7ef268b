"""The generated CRDs: committed copy in sync, structural as Kubernetes requires, examples valid against them."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from extproc.kube.crds import KINDS, crd, render_crds
from tests.conftest import ROOT

KUBERNETES_VERSION = "1.33"
COMMITTED = ROOT / "helm" / "model-broker" / "crds" / "crds.yaml"
EXAMPLES = sorted((ROOT / "examples" / "k8s").glob("*.yaml"))
# Value validations only: what a structural schema allows inside allOf/anyOf/oneOf/not.
TYPING_KEYS = {"type", "default", "description", "additionalProperties", "nullable", "x-kubernetes-list-type"}


def subschemas(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from subschemas(child, f"{path}.{name}")
    if "items" in node:
        yield from subschemas(node["items"], f"{path}[]")


def strict(schema: Any) -> Any:
    """The schema as `kubectl apply` enforces it: unknown fields are errors (strict field validation)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and out.get("type") == "object" and "metadata" not in out["properties"]:
        out["additionalProperties"] = False
    return out


def open_api_schema(kind: str) -> dict[str, Any]:
    doc = next(c for c in yaml.safe_load_all(render_crds()) if c["spec"]["names"]["kind"] == kind)
    schema: dict[str, Any] = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def test_committed_crds_match_the_generator() -> None:
    """helm/model-broker/crds/crds.yaml is exactly what `model-broker crds` prints; regenerate with `make crds`."""
    assert COMMITTED.read_text(encoding="utf-8") == render_crds()


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_crd_is_a_valid_kubernetes_object(kind: Any) -> None:
    """Each CRD validates against the apiextensions.k8s.io/v1 schema of the stated Kubernetes version."""
    kubernetes_validate.validate(crd(kind), KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_crd_schema_is_structural(kind: Any) -> None:
    """Every node is typed, no $ref or null branches remain, and combinators carry only value validations."""
    schema = crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    text = yaml.safe_dump(schema)
    # 'null' may be an enum value (missing_features), never a type.
    assert "$ref" not in text and "type: 'null'" not in text and "anyOf" not in text
    for path, node in subschemas(schema):
        assert node.get("type"), f"{path or '<root>'} has no type"
        for combinator in ("oneOf", "anyOf", "allOf"):
            for branch in node.get(combinator, []):
                assert not TYPING_KEYS & branch.keys(), f"{path}.{combinator} types a value"


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_crd_defaults_are_valid_values(kind: Any) -> None:
    """The API server rejects a CRD whose defaults fail their own schema; each default passes it here."""
    schema = crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for _path, node in subschemas(schema):
        if "default" in node:
            jsonschema.validate(node["default"], node)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_examples_are_valid_resources(example: Path) -> None:
    """Every resource under examples/k8s passes its CRD's schema with unknown fields rejected."""
    for doc in yaml.safe_load_all(example.read_text(encoding="utf-8")):
        jsonschema.validate(doc, strict(open_api_schema(doc["kind"])))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s["versions"][0].update(weight=-1), "less than the minimum"),
        (lambda s: s.update(failure_policy="sometimes"), "is not one of"),
        (
            lambda s: s["versions"][0]["backend"].update(sagemaker={"endpoint": "e", "region": "eu-west-1"}),
            "valid under each",
        ),
        (lambda s: s["versions"][0].update(wieght=3), "Additional properties"),
        (lambda s: s.pop("entity"), "'entity' is a required property"),
    ],
    ids=["negative-weight", "unknown-policy", "two-backends", "typo", "missing-entity"],
)
def test_crd_rejects_what_the_registry_rejects(change: Any, message: str) -> None:
    """Field-level mistakes the registry refuses are refused by the CRD schema at `kubectl apply` too."""
    doc = copy.deepcopy(yaml.safe_load((ROOT / "examples" / "k8s" / "credit-risk.yaml").read_text()))
    change(doc["spec"])
    with pytest.raises(jsonschema.ValidationError, match=message):
        jsonschema.validate(doc, strict(open_api_schema("Model")))
