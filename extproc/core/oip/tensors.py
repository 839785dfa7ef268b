"""Open Inference Protocol tensors: datatypes, shape checks, and feature values converted to a datatype.

Pure; every check returns a message (or a converted value), never raises on bad input.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any, Final, get_args

from extproc.registry import Datatype

# OIP's tensor datatypes (inference_rest.md, "Tensor Data Types"), as the registry declares them.
DATATYPES: Final = get_args(Datatype)
_INT_RANGES: Final = {
    "UINT8": range(0, 2**8),
    "UINT16": range(0, 2**16),
    "UINT32": range(0, 2**32),
    "UINT64": range(0, 2**64),
    "INT8": range(-(2**7), 2**7),
    "INT16": range(-(2**15), 2**15),
    "INT32": range(-(2**31), 2**31),
    "INT64": range(-(2**63), 2**63),
}
# Largest finite magnitude of each float datatype: beyond it the model would get inf.
_FLOAT_MAX: Final = {"FP16": 65504.0, "FP32": 3.4028234663852886e38, "FP64": sys.float_info.max}

Converted = tuple[bool, Any]


def _integer(value: Any, datatype: str) -> Converted:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value not in _INT_RANGES[datatype]:
        return False, None
    return True, value


def _float(value: Any, datatype: str) -> Converted:
    """Finite numbers within the datatype's range (NaN and infinities fail the comparison)."""
    if type(value) is not float and type(value) is not int:  # exact types: bool is not a number here
        return False, None
    try:
        number = float(value)
    except OverflowError:  # an integer past any float
        return False, None
    return (True, number) if abs(number) <= _FLOAT_MAX[datatype] else (False, None)


def _bool(value: Any, datatype: str) -> Converted:
    return (True, value) if isinstance(value, bool) else (False, None)


def _bytes(value: Any, datatype: str) -> Converted:
    """Text as is; numbers as their decimal text (what a model reading strings expects)."""
    if isinstance(value, str):
        return True, value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return True, str(value)
    return False, None


_CONVERTERS: Final[dict[str, Callable[[Any, str], Converted]]] = {
    **dict.fromkeys(_INT_RANGES, _integer),
    **dict.fromkeys(_FLOAT_MAX, _float),
    "BOOL": _bool,
    "BYTES": _bytes,
}


def convert(value: Any, datatype: str) -> Converted:
    """(True, the value as `datatype` holds it) or (False, None) when it does not fit."""
    return _CONVERTERS[datatype](value, datatype)


def element_count(data: list[Any]) -> int:
    """Elements of row-major `data`, flat or nested (both are valid OIP)."""
    count = 0
    stack = [data]
    while stack:
        items = stack.pop()
        for item in items:
            if isinstance(item, list):
                stack.append(item)
            else:
                count += 1
    return count


def flatten(data: list[Any]) -> list[Any]:
    """Row-major elements of flat or nested `data`."""
    if not any(isinstance(item, list) for item in data):
        return data
    out: list[Any] = []
    for item in data:
        out.extend(flatten(item) if isinstance(item, list) else (item,))
    return out


def tensor_problem(tensor: Any, where: str) -> str:
    """Why `tensor` is not a valid OIP JSON input tensor, or ''."""
    if not isinstance(tensor, dict):
        return f"{where} must be an object with name, shape, datatype and data"
    name = tensor.get("name")
    if not isinstance(name, str) or not name:
        return f"{where} needs a non-empty string 'name'"
    if tensor.get("datatype") not in DATATYPES:
        return f"input '{name}' has datatype {tensor.get('datatype')!r}; expected one of {', '.join(DATATYPES)}"
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return f"input '{name}' needs 'shape', a list of non-negative integers"
    return _data_problem(name, shape, tensor.get("data"), tensor.get("parameters"))


def _data_problem(name: str, shape: list[int], data: Any, parameters: Any) -> str:
    if not isinstance(data, list):
        if isinstance(parameters, dict) and "binary_data_size" in parameters:
            return f"input '{name}' is binary data, which this route does not accept; send JSON 'data'"
        return f"input '{name}' needs 'data', a list"
    expected = math.prod(shape)
    count = element_count(data) if any(isinstance(item, list) for item in data) else len(data)
    if count != expected:
        return f"input '{name}' has {count} elements but shape {shape} needs {expected}"
    return ""
