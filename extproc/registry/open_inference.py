"""The Open Inference Protocol settings of a model: where the entity key is, how features become tensors.

A model with `protocol: open_inference` is served at the V2 paths
(`/v2/models/<name>/infer`, `/versions/<v>/infer`, metadata, ready); its backends
are OIP servers (MLServer, Triton, KServe) addressed by their own infer paths.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, model_validator

from extproc.expressions import ResultType, compile_expression
from extproc.registry.common import Strict
from extproc.registry.logic import expression_scopes
from extproc.registry.patterns import FEATURE_NAME, HEADER_NAME, PARAMETER_NAME, TENSOR_NAME

if TYPE_CHECKING:
    from extproc.registry.models import Model

# OIP's datatypes (inference_rest.md, "Tensor Data Types").
Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"
]
TensorName = Annotated[str, Field(pattern=TENSOR_NAME)]
# Every V2 path starts here; JSON models and ensembles may not use it.
V2_PREFIX = "/v2"
BACKEND_INFER_SUFFIX = "/infer"
# What an OIP backend's path must look like: the server's own infer path for one model (version).
BACKEND_INFER_PATH = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$")


class EntityKeySource(Strict):
    """Where OIP requests carry the entity key: exactly one of an input tensor, a parameter, a header."""

    # An input tensor of shape [N] or [N, 1], one key per row.
    input: TensorName | None = None
    datatype: Literal["BYTES", "INT64"] = "BYTES"
    # Send the key tensor on to the model too; by default it is removed (models rarely take ids).
    forward_input: bool = False
    # A request `parameters` entry (one row).
    parameter: Annotated[str, Field(pattern=PARAMETER_NAME)] | None = None
    # A request header (one row); tritonclient sends it with `infer(..., headers=...)`.
    header: Annotated[str, Field(pattern=HEADER_NAME)] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> EntityKeySource:
        if sum(x is not None for x in (self.input, self.parameter, self.header)) != 1:
            raise ValueError("declare exactly one of 'input', 'parameter' or 'header'")
        return self


class FeatureTensor(Strict):
    """All features in one [N, k] tensor, columns in the model's `features` order (KServe's Feast layout)."""

    name: TensorName
    datatype: Literal["FP32", "FP64"] = "FP32"


class TensorElement(Strict):
    """Where an ensemble reads an OIP member's answer: one element of one output tensor (row-major)."""

    tensor: TensorName
    index: Annotated[int, Field(ge=0, le=1_000_000)] = 0


class OpenInference(Strict):
    # Default: an input tensor named after the entity's join key (BYTES).
    entity_key: EntityKeySource | None = None
    # Exactly one layout: one [N, k] tensor, or one [N, 1] input per feature (name: datatype).
    feature_tensor: FeatureTensor | None = None
    # (Keys checked below: a key pattern would be `patternProperties`, which CRD schemas lack.)
    feature_inputs: dict[str, Datatype] | None = None
    # Rows (entity keys) per request: each is a feature-store lookup.
    max_rows: Annotated[int, Field(ge=1, le=10_000)] = 256

    @model_validator(mode="after")
    def _one_layout(self) -> OpenInference:
        if self.feature_tensor is not None and self.feature_inputs is not None:
            raise ValueError("declare one of 'feature_tensor' or 'feature_inputs', not both")
        for name in self.feature_inputs or ():
            if not re.match(FEATURE_NAME, name):
                raise ValueError(f"feature_inputs: '{name}' is not a feature name")
        return self


# A derived feature's own input tensor takes the datatype of its declared type, unless `feature_inputs`
# names it with another datatype that type can fill.
DERIVED_DATATYPES: dict[ResultType, str] = {"double": "FP64", "int": "INT64", "bool": "BOOL", "string": "BYTES"}
_FILLS: dict[ResultType, frozenset[str]] = {
    "double": frozenset({"FP16", "FP32", "FP64"}),
    "int": frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "FP32", "FP64"}),
    "bool": frozenset({"BOOL"}),
    "string": frozenset({"BYTES"}),
}
# What `body` holds on an OIP request: this row's value of each client input tensor, and the request's
# `parameters` (the OIP JSON body's own two fields, so `body.inputs.x` reads as the request is written).
BODY_SECTIONS = ("inputs", "parameters")


def derived_layout(model: Model) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Where each derived feature goes: extra columns of the feature tensor (after the stored ones, in
    declared order), or one [N, 1] input each, named after it: (columns, ((input, datatype), ...))."""
    oip = open_inference_settings(model)
    if oip.feature_tensor is not None:
        return tuple(d.name for d in model.derived), ()
    declared = oip.feature_inputs or {}
    return (), tuple((d.name, declared.get(d.name, DERIVED_DATATYPES[d.type])) for d in model.derived)


def infer_path(model: str) -> str:
    return f"{V2_PREFIX}/models/{model}/infer"


def is_v2_path(path: str) -> bool:
    return path == V2_PREFIX or path.startswith(V2_PREFIX + "/")


def open_inference_settings(model: Model) -> OpenInference:
    """The model's OIP settings, defaults filled in (only meaningful for OIP models)."""
    return model.open_inference or OpenInference()


def entity_key_source(model: Model, join_key: str) -> EntityKeySource:
    """Declared, or by default an input tensor named after the entity's join key."""
    return open_inference_settings(model).entity_key or EntityKeySource(input=join_key)


def model_problems(model: Model, join_key: str, here: str) -> Iterator[tuple[str, str]]:
    """(field path, problem) for one model: OIP settings on an OIP model, no V2 path on a JSON one."""
    if model.protocol == "open_inference":
        yield from _settings_problems(model, join_key, here)
        yield from _version_problems(model, here)
        return
    if model.open_inference is not None:
        yield f"{here}.open_inference", "only for 'protocol: open_inference'"
    if not model.path:
        yield f"{here}.path", "declare the path the model is served at"
    elif is_v2_path(model.path):
        yield f"{here}.path", f"paths under {V2_PREFIX}/ are the Open Inference Protocol's"


def _settings_problems(model: Model, join_key: str, here: str) -> Iterator[tuple[str, str]]:
    oip = open_inference_settings(model)
    key = entity_key_source(model, join_key)
    injected = {oip.feature_tensor.name} if oip.feature_tensor else set(oip.feature_inputs or ())
    if key.input is not None and key.input in injected:
        yield f"{here}.open_inference.entity_key.input", f"'{key.input}' is also a feature tensor's name"
    if model.path != infer_path(model.name):
        yield f"{here}.path", f"an open_inference model is served at {infer_path(model.name)}; leave 'path' out"
    if model.features and oip.feature_tensor is None and oip.feature_inputs is None:
        yield f"{here}.open_inference", "declare 'feature_tensor' or 'feature_inputs': how features become tensors"
    derived = {d.name: d.type for d in model.derived}
    if oip.feature_inputs is not None and not set(model.features) <= set(oip.feature_inputs) <= {
        *model.features,
        *derived,
    }:
        yield (
            f"{here}.open_inference.feature_inputs",
            "must name every feature of the model, and may name its derived features (nothing else)",
        )
    yield from _derived_problems(model, key.input, derived, here)
    if model.unknown_entity == "forward":
        yield f"{here}.unknown_entity", "a tensor has no row for an unknown entity; use 'reject'"
    if model.sticky is not None and model.sticky.body_field is not None:
        yield f"{here}.sticky.body_field", "OIP requests have no body fields; use 'sticky.header'"
    if model.missing_features != "reject":
        yield f"{here}.missing_features", "a tensor has no null and no missing column; use 'reject'"
    yield from _body_problems(model, injected, here)


def _derived_problems(
    model: Model, key_input: str | None, derived: dict[str, ResultType], here: str
) -> Iterator[tuple[str, str]]:
    oip = open_inference_settings(model)
    for j, (name, kind) in enumerate(derived.items()):
        at = f"{here}.derived[{j}]"
        if oip.feature_tensor is not None and kind not in ("double", "int"):
            yield (
                f"{at}.type",
                f"derived '{name}' is a {kind}, but it would be a column of the {oip.feature_tensor.datatype} "
                f"tensor '{oip.feature_tensor.name}'; declare 'feature_inputs' to send it as its own input",
            )
        datatype = (oip.feature_inputs or {}).get(name)
        if datatype is not None and datatype not in _FILLS[kind]:
            yield (
                f"{here}.open_inference.feature_inputs.{name}",
                f"a {kind} derived feature cannot fill a {datatype} tensor",
            )
        if name == key_input:
            yield f"{at}.name", f"'{name}' is also the entity key tensor's name"


def _body_problems(model: Model, injected: set[str], here: str) -> Iterator[tuple[str, str]]:
    """What an expression reads of an OIP request: `body.inputs.<tensor>` and `body.parameters.<name>`."""
    names = injected | {name for name, _ in derived_layout(model)[1]}
    for path, label, source, result, visible in expression_scopes(model):
        compiled = compile_expression(source, visible, result)
        if isinstance(compiled, str):  # logic_problems reports it
            continue
        problem = ""
        outside = sorted(set(compiled.body_fields or ()) - set(BODY_SECTIONS))
        if compiled.body_fields is None or outside:
            read = "the whole body" if compiled.body_fields is None else f"body.{outside[0]}"
            problem = (
                f"reads {read}; on an open_inference model `body` holds `inputs` (this row's value of each "
                "input tensor: body.inputs.<tensor>) and `parameters` (the request's: body.parameters.<name>)"
            )
        spoofed = sorted(name for section, name in compiled.body_paths if section == "inputs" and name in names)
        if spoofed:
            problem = f"body.inputs.{spoofed[0]} is a tensor the broker injects; read features.{spoofed[0]}"
        if problem:
            yield f"{here}.{path}", f"{model.name}: {label} `{source}`: {problem}"


def _version_problems(model: Model, here: str) -> Iterator[tuple[str, str]]:
    for j, version in enumerate(model.versions):
        if version.features:
            yield (
                f"{here}.versions[{j}].features",
                "a tensor's columns are the same for every version; declare features on the model",
            )
        service = version.backend.service
        if service is None:
            yield f"{here}.versions[{j}].backend", "an open_inference model needs 'service' backends (OIP servers)"
        elif not BACKEND_INFER_PATH.match(service.path):
            yield (
                f"{here}.versions[{j}].backend.service.path",
                "the server's infer path, /v2/models/<name>[/versions/<version>]/infer",
            )
