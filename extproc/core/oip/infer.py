"""An OIP `infer` request through the broker: read the entity keys, add feature tensors, re-encode.

Pure: the body phase (`extproc.core.oip_body`) fetches the features between
`read_infer_request` and `forward_body`. Every problem is a `BrokerError` the route answers in OIP shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from extproc.core.body import check_content_type, parse_json_object
from extproc.core.oip.tensors import convert, flatten, tensor_problem
from extproc.errors import BrokerError, ErrorCode
from extproc.registry import Model, derived_layout, entity_key_source, open_inference_settings

# The longest entity key accepted, as on JSON routes.
MAX_KEY_LENGTH = 256


@dataclass(frozen=True, slots=True)
class OipPlan:
    """One OIP model's request plan, compiled from the registry at load."""

    model: str
    features: tuple[str, ...]
    # Exactly one entity-key source is set.
    key_input: str | None = None
    key_datatype: str = "BYTES"
    forward_key_input: bool = False
    key_parameter: str | None = None
    key_header: str | None = None
    # Either one [N, k] tensor (name, datatype) or one [N, 1] input per feature (feature, datatype).
    tensor: tuple[str, str] | None = None
    inputs: tuple[tuple[str, str], ...] = ()
    max_rows: int = 256
    # Derived features: extra columns of `tensor` (after `features`), or one [N, 1] input each.
    derived_columns: tuple[str, ...] = ()
    derived_inputs: tuple[tuple[str, str], ...] = ()

    @property
    def injected(self) -> frozenset[str]:
        """Input names the broker writes; a client's tensor of the same name is replaced."""
        stored = [self.tensor[0]] if self.tensor else [name for name, _ in self.inputs]
        return frozenset(stored) | {name for name, _ in self.derived_inputs}

    @property
    def entity_description(self) -> str:
        if self.key_input is not None:
            return f"input tensor '{self.key_input}' ({self.key_datatype}, shape [N, 1])"
        if self.key_parameter is not None:
            return f"request parameter '{self.key_parameter}'"
        return f"header '{self.key_header}'"


def compile_plan(model: Model, join_key: str) -> OipPlan:
    """The plan of an `open_inference` model (the registry checked its settings)."""
    settings = open_inference_settings(model)
    key = entity_key_source(model, join_key)
    tensor = settings.feature_tensor
    columns, derived_inputs = derived_layout(model)
    inputs = tuple(
        (name, datatype) for name, datatype in (settings.feature_inputs or {}).items() if name in model.features
    )
    return OipPlan(
        model=model.name,
        features=model.features,
        key_input=key.input,
        key_datatype=key.datatype,
        forward_key_input=key.forward_input,
        key_parameter=key.parameter,
        key_header=key.header,
        tensor=(tensor.name, tensor.datatype) if tensor is not None else None,
        inputs=inputs,
        max_rows=settings.max_rows,
        derived_columns=columns,
        derived_inputs=derived_inputs,
    )


@dataclass(frozen=True, slots=True)
class InferRequest:
    """The client's request, checked: its document and one entity key per row."""

    doc: dict[str, Any]
    keys: tuple[str, ...]


def check_oip_content_type(content_type: str) -> BrokerError | None:
    """OIP clients (tritonclient) send no content type: none means JSON here."""
    return None if not content_type.strip() else check_content_type(content_type)


def read_infer_request(
    plan: OipPlan, raw: bytes, *, content_type: str, header_key: str, max_depth: int
) -> InferRequest | BrokerError:
    """The request as OIP JSON with valid input tensors and the entity keys it carries."""
    unsupported = check_oip_content_type(content_type)
    doc = unsupported or parse_json_object(raw, max_depth)
    if isinstance(doc, BrokerError):
        return doc
    # A key from a parameter or header leaves the client nothing to send but what it has.
    problem = _inputs_problem(doc.get("inputs"), allow_empty=plan.key_input is None)
    if not problem and not isinstance(doc.get("parameters", {}), dict):
        problem = "'parameters' must be an object"
    if problem:
        return BrokerError(ErrorCode.INVALID_TENSOR, problem)
    keys = _entity_keys(plan, doc["inputs"], doc.get("parameters", {}), header_key)
    return keys if isinstance(keys, BrokerError) else InferRequest(doc, keys)


def _inputs_problem(inputs: Any, allow_empty: bool) -> str:
    if not isinstance(inputs, list) or not (inputs or allow_empty):
        return "the request needs 'inputs', a non-empty list of tensors"
    seen: set[str] = set()
    for i, tensor in enumerate(inputs):
        problem = tensor_problem(tensor, f"inputs[{i}]")
        if problem:
            return problem
        if tensor["name"] in seen:
            return f"input '{tensor['name']}' appears twice"
        seen.add(tensor["name"])
    return ""


def _entity_keys(
    plan: OipPlan, inputs: list[dict[str, Any]], parameters: dict[str, Any], header_key: str
) -> tuple[str, ...] | BrokerError:
    """One key per row from the key tensor, or the one key of a parameter or header."""
    if plan.key_input is not None:
        tensor = next((t for t in inputs if t["name"] == plan.key_input), None)
        if tensor is not None:
            return _keys_from_tensor(plan, tensor)
        value = None
    elif plan.key_parameter is not None:
        value = parameters.get(plan.key_parameter)
    else:
        value = header_key or None
    if value is None:
        return BrokerError(ErrorCode.MISSING_ENTITY_KEY, f"the request has no {plan.entity_description}")
    key = _key(value)
    if key is None:
        return BrokerError(ErrorCode.INVALID_ENTITY_KEY, f"{plan.entity_description} {_KEY_RULE}")
    return (key,)


_KEY_RULE = f"must be a non-empty string (at most {MAX_KEY_LENGTH} printable characters) or an integer"


def _key(value: Any) -> str | None:
    if isinstance(value, str) and value and len(value) <= MAX_KEY_LENGTH and value.isprintable():
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _keys_from_tensor(plan: OipPlan, tensor: dict[str, Any]) -> tuple[str, ...] | BrokerError:
    """One key per row: shape [N] or [N, 1], N within the model's row limit."""
    where = plan.entity_description
    if tensor["datatype"] != plan.key_datatype:
        return BrokerError(ErrorCode.INVALID_ENTITY_KEY, f"{where}: got datatype {tensor['datatype']}")
    shape = tensor["shape"]
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or shape[0] < 1:
        return BrokerError(ErrorCode.INVALID_ENTITY_KEY, f"{where}: got shape {shape}")
    if shape[0] > plan.max_rows:
        return BrokerError(
            ErrorCode.TOO_MANY_ROWS, f"{shape[0]} rows; at most {plan.max_rows} per request for {plan.model}"
        )
    keys = []
    for i, value in enumerate(flatten(tensor["data"])):
        wrong_kind = isinstance(value, str) != (plan.key_datatype == "BYTES")
        key = None if wrong_kind else _key(value)
        if key is None:
            return BrokerError(
                ErrorCode.INVALID_ENTITY_KEY, f"{where}: row {i} holds {_shown(value)}; each key {_KEY_RULE}"
            )
        keys.append(key)
    return tuple(keys)


def _shown(value: Any) -> str:
    try:
        text = orjson.dumps(value).decode()
    except TypeError:  # an integer past 64 bits, which orjson does not write: its digits
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def feature_tensors(
    plan: OipPlan, keys: Sequence[str], rows: Sequence[Mapping[str, Any]], join_key: str
) -> list[dict[str, Any]] | BrokerError:
    """The injected tensors for N rows; a value the declared datatype cannot hold is an error naming it."""
    n = len(rows)
    tensors = []
    if plan.tensor is not None:
        name, datatype = plan.tensor
        columns = (*plan.features, *plan.derived_columns)
        data = []
        for key, row in zip(keys, rows, strict=True):
            for feature in columns:
                value = _converted(row.get(feature), datatype, feature, key, join_key)
                if isinstance(value, BrokerError):
                    return value
                data.append(value)
        tensors.append({"name": name, "shape": [n, len(columns)], "datatype": datatype, "data": data})
    for feature, datatype in (*plan.inputs, *plan.derived_inputs):
        column = []
        for key, row in zip(keys, rows, strict=True):
            value = _converted(row.get(feature), datatype, feature, key, join_key)
            if isinstance(value, BrokerError):
                return value
            column.append(value)
        tensors.append({"name": feature, "shape": [n, 1], "datatype": datatype, "data": column})
    return tensors


def _converted(value: Any, datatype: str, feature: str, key: str, join_key: str) -> Any:
    if value is None:
        return BrokerError(ErrorCode.INVALID_FEATURE, f"feature '{feature}' of {join_key} '{key}' has no value")
    ok, converted = convert(value, datatype)
    if not ok:
        return BrokerError(
            ErrorCode.INVALID_FEATURE,
            f"feature '{feature}' of {join_key} '{key}' is {_shown(value)}, which is not a valid {datatype}",
        )
    return converted


def member_body(
    plan: OipPlan, key: str, features: Mapping[str, Any], join_key: str, output: str | None
) -> bytes | BrokerError:
    """An ensemble's call to an OIP member: one row of feature tensors, asking for the combined output."""
    tensors = feature_tensors(plan, [key], [features], join_key)
    if isinstance(tensors, BrokerError):
        return tensors
    if plan.key_input is not None and plan.forward_key_input:
        value: Any = key if plan.key_datatype == "BYTES" else int(key)
        tensors.insert(0, {"name": plan.key_input, "shape": [1, 1], "datatype": plan.key_datatype, "data": [value]})
    doc: dict[str, Any] = {"inputs": tensors}
    if output is not None:
        doc["outputs"] = [{"name": output}]
    return orjson.dumps(doc)


def output_element(answer: Any, tensor: str, index: int) -> Any:
    """Element `index` (row-major) of output `tensor` in an OIP answer; None when there is none."""
    outputs = answer.get("outputs") if isinstance(answer, dict) else None
    for output in outputs if isinstance(outputs, list) else ():
        if isinstance(output, dict) and output.get("name") == tensor and isinstance(output.get("data"), list):
            data = flatten(output["data"])
            return data[index] if index < len(data) else None
    return None


def forward_body(plan: OipPlan, request: InferRequest, tensors: list[dict[str, Any]]) -> bytes:
    """The client's request with the feature tensors added (the key tensor removed unless forwarded)."""
    drop = plan.injected if plan.forward_key_input or plan.key_input is None else plan.injected | {plan.key_input}
    doc = request.doc
    doc["inputs"] = [t for t in doc["inputs"] if t["name"] not in drop] + tensors
    return orjson.dumps(doc)


def error_json(error: BrokerError) -> dict[str, str]:
    """OIP's error shape: one string, code first, so clients that print `error` show both."""
    return {"error": f"{error.code.value}: {error.message}"}
