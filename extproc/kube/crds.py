"""Kubernetes CustomResourceDefinitions generated from the registry's pydantic models.

The CRDs and the YAML registry are validated by the same models, so the two
cannot drift; `model-broker crds` prints them and a test compares them with the
copies committed under `helm/model-broker/crds/`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel

from extproc.registry import Ensemble, Model

GROUP = "model-broker.io"
VERSION = "v1alpha1"
# The status condition the broker writes on every resource it has looked at.
CONDITION_ACCEPTED = "Accepted"

# What a structural schema may not carry: JSON Schema bookkeeping Kubernetes rejects or ignores.
_DROPPED_KEYS = frozenset({"title", "$defs", "additionalProperties"})


@dataclass(frozen=True, slots=True)
class Column:
    """One `kubectl get` column (`additionalPrinterColumns`)."""

    name: str
    type: str
    json_path: str


@dataclass(frozen=True, slots=True)
class Kind:
    """A registry list exposed as a custom resource: `metadata.name` is the entry's `name`."""

    kind: str
    plural: str
    schema: type[BaseModel]
    registry_field: str
    columns: tuple[Column, ...] = ()

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"


# Every kind the broker reads from the cluster.
KINDS: tuple[Kind, ...] = (
    Kind(
        "Model",
        "models",
        Model,
        "models",
        (
            Column("Path", "string", ".spec.path"),
            Column("Versions", "string", ".spec.versions[*].name"),
            Column("Weights", "string", ".spec.versions[*].weight"),
        ),
    ),
    Kind(
        "Ensemble",
        "ensembles",
        Ensemble,
        "ensembles",
        (
            Column("Path", "string", ".spec.path"),
            Column("Members", "string", ".spec.members[*].model"),
            Column("Aggregation", "string", ".spec.aggregation.method"),
        ),
    ),
)

_STATUS_COLUMNS = (
    Column("Accepted", "string", f'.status.conditions[?(@.type=="{CONDITION_ACCEPTED}")].status'),
    Column("Age", "date", ".metadata.creationTimestamp"),
)


def kind_named(kind: str) -> Kind | None:
    return next((k for k in KINDS if k.kind == kind), None)


def structural(node: Any, defs: Mapping[str, Any]) -> Any:
    """A pydantic JSON schema as a Kubernetes structural schema.

    Kubernetes wants every type spelled out in place: `$ref`s are inlined,
    `anyOf [X, null]` (an optional field) becomes X, since absence is how a
    resource says "not set". Unknown fields are pruned by the API server and
    rejected by `kubectl apply`'s strict field validation, so
    `additionalProperties: false` is dropped rather than translated.
    """
    if isinstance(node, list):
        return [structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return structural(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
    branches = node.get("anyOf")
    if branches is not None:
        not_null = [b for b in branches if b.get("type") != "null"]
        if len(not_null) == 1:
            rest = {k: v for k, v in node.items() if k != "anyOf" and not (k == "default" and v is None)}
            return structural({**not_null[0], **rest}, defs)
    out = {key: structural(value, defs) for key, value in node.items() if key not in _DROPPED_KEYS}
    items = out.get("items", {}) if out.get("type") == "array" else {}
    if items.get("type") == "object" and "name" in items.get("required", ()):
        # Lists of named entries merge by name under server-side apply, so a weight
        # change from one manager does not replace the whole list.
        out["x-kubernetes-list-type"] = "map"
        out["x-kubernetes-list-map-keys"] = ["name"]
    return out


def spec_schema(schema: type[BaseModel]) -> dict[str, Any]:
    """The `spec` schema of a kind: the registry entry without `name` (that is `metadata.name`)."""
    raw = schema.model_json_schema()
    spec: dict[str, Any] = structural(raw, raw.get("$defs", {}))
    spec["properties"].pop("name")
    spec["required"] = [r for r in spec.get("required", []) if r != "name"]
    return spec


def _status_schema() -> dict[str, Any]:
    """Standard `metav1.Condition`s, keyed by type, plus the generation they describe."""
    condition = {
        "type": "object",
        "required": ["type", "status", "reason", "message", "lastTransitionTime"],
        "properties": {
            "type": {"type": "string"},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "reason": {"type": "string"},
            "message": {"type": "string", "maxLength": 32768},
            "observedGeneration": {"type": "integer", "minimum": 0},
            "lastTransitionTime": {"type": "string", "format": "date-time"},
        },
    }
    return {
        "type": "object",
        "properties": {
            "observedGeneration": {"type": "integer", "minimum": 0},
            "conditions": {
                "type": "array",
                "items": condition,
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
        },
    }


def crd(kind: Kind) -> dict[str, Any]:
    """One apiextensions.k8s.io/v1 CustomResourceDefinition, with status subresource and columns."""
    columns = [{"name": c.name, "type": c.type, "jsonPath": c.json_path} for c in kind.columns + _STATUS_COLUMNS]
    schema = {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema(kind.schema),
            "status": _status_schema(),
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": kind.crd_name},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.kind.lower(),
                "categories": ["model-broker"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                }
            ],
        },
    }


def render_crds() -> str:
    """Every CRD as one multi-document YAML stream (what `model-broker crds` prints)."""
    return "".join("---\n" + yaml.safe_dump(crd(kind), sort_keys=False) for kind in KINDS)
