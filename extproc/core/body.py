"""The request body: parse the consumer's JSON, find the entity key, inject features.

Pure functions; each returns a value or a `BrokerError`, never raises on bad input.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import orjson

from extproc.errors import BrokerError, ErrorCode
from extproc.registry import Limits

JSONObject = dict[str, Any]

_JSON_TYPES = ("application/json",)

# orjson silently turns integers outside [-2**63, 2**64) into floats, so the model would
# get a different number than the client sent. Such integers have at least 19 digits;
# only bodies with a run that long pay for the exact (stdlib) second look.
_LONG_DIGIT_RUN = re.compile(rb"\d{19}")
_INT_RANGE = range(-(2**63), 2**64)
# No structure limit unless the caller (the registry's `limits`) sets one.
UNLIMITED = sys.maxsize


def check_content_type(content_type: str) -> BrokerError | None:
    """Accept `application/json` and `application/*+json`, with or without parameters."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media in _JSON_TYPES or (media.startswith("application/") and media.endswith("+json")):
        return None
    shown = media or "none"
    return BrokerError(
        ErrorCode.UNSUPPORTED_MEDIA_TYPE,
        f"content-type {shown!r} is not JSON; send 'Content-Type: application/json'",
    )


def _shape_error(value: Any, max_depth: int, max_containers: int) -> str:
    """Why the document is too deep or has too many objects and arrays, or "".

    Iterative, so a hostile document cannot exhaust the Python stack; stops at the
    first container past either limit, so the walk costs at most `max_containers` steps.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    seen = 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if depth > max_depth:
            return f"the request body nests deeper than {max_depth} levels"
        if seen > max_containers:
            return f"the request body has more than {max_containers} objects and arrays"
        children = node.values() if isinstance(node, dict) else node
        stack.extend((v, depth + 1) for v in children if isinstance(v, (dict, list)))
    return ""


def _refused_unparsed(raw: bytes, max_elements: int) -> BrokerError | None:
    """What needs no parsing: an empty body, more elements than the limit (each needs a comma)."""
    if not raw.strip():
        return BrokerError(ErrorCode.INVALID_JSON, "the request body is empty; send a JSON object")
    if raw.count(b",") >= max_elements:
        return BrokerError(ErrorCode.INVALID_BODY, f"the request body has more than {max_elements} elements")
    return None


def parse_json_object(
    raw: bytes, max_depth: int, *, max_containers: int = UNLIMITED, max_elements: int = UNLIMITED
) -> JSONObject | BrokerError:
    """The body must be one UTF-8 JSON object within the depth and structure limits.

    A body's cost is per node, not per byte (60 KB of `[]` cost ten times a flat 60 KB
    body): the element count is bounded from the commas before parsing, the containers
    from the brackets, both at C speed; only a body past a bracket count is walked.
    """
    if refused := _refused_unparsed(raw, max_elements):
        return refused
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return BrokerError(ErrorCode.INVALID_JSON, f"the request body is not valid JSON: {exc}")
    if not isinstance(doc, dict):
        return BrokerError(ErrorCode.INVALID_BODY, f"the request body must be a JSON object, not {_kind(doc)}")
    # Counting brackets is C-speed and bounds depth and containers from above: most bodies stop here.
    brackets = raw.count(b"{") + raw.count(b"[")
    if brackets > min(max_depth, max_containers) and (shape := _shape_error(doc, max_depth, max_containers)):
        return BrokerError(ErrorCode.INVALID_BODY, shape)
    if _LONG_DIGIT_RUN.search(raw) and (huge := _integer_out_of_range(raw)):
        return BrokerError(
            ErrorCode.INVALID_BODY, f"an integer ({huge[:40]}) is outside the 64-bit range; send it as a string"
        )
    return doc


def too_large(max_body_bytes: int) -> BrokerError:
    """The refusal of a body past the registry's `limits.max_body_bytes`, on every route kind."""
    return BrokerError(ErrorCode.BODY_TOO_LARGE, f"the request body is larger than {max_body_bytes} bytes")


def read_document(raw: bytes, content_type: str, limits: Limits) -> JSONObject | BrokerError:
    """The body as a JSON object, if it is JSON, within the size limit and well formed.

    The registry's depth and structure limits are checked before any walk over the document.
    """
    unsupported = check_content_type(content_type)
    if unsupported is not None:
        return unsupported
    if len(raw) > limits.max_body_bytes:
        return too_large(limits.max_body_bytes)
    return parse_json_object(
        raw, limits.max_json_depth, max_containers=limits.max_json_containers, max_elements=limits.max_json_elements
    )


def _integer_out_of_range(raw: bytes) -> str:
    """The first integer literal orjson would have turned into a float, or ''.

    Runs after the depth check, so the stdlib parser's recursion is bounded.
    """
    found: list[str] = []

    def exact(literal: str) -> int:
        if not found and int(literal) not in _INT_RANGE:
            found.append(literal)
        return 0

    # Cannot fail where orjson succeeded: the stdlib accepts a superset of JSON, and its
    # 4300-digit integer limit is unreachable (orjson refused anything past 1e308 already).
    json.loads(raw, parse_int=exact)
    return found[0] if found else ""


def entity_key(doc: JSONObject, join_key: str) -> str | BrokerError:
    """The entity's key from the body: a non-empty string or an integer."""
    if join_key not in doc:
        return BrokerError(ErrorCode.MISSING_ENTITY_KEY, f"the request body has no '{join_key}' field")
    value = doc[join_key]
    if isinstance(value, str) and value and len(value) <= 256 and value.isprintable():
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return BrokerError(
        ErrorCode.INVALID_ENTITY_KEY,
        f"'{join_key}' must be a non-empty string (at most 256 printable characters) or an integer, not {_kind(value)}",
    )


def inject_features(doc: JSONObject, inject_as: str, features: dict[str, Any]) -> bytes:
    """The enriched body; the injected key replaces whatever the consumer sent there."""
    doc[inject_as] = features
    return orjson.dumps(doc)


def sticky_key(doc: JSONObject, field: str) -> str:
    """The sticky A/B key from the body; "" when absent, which Envoy hashes like any other value
    (keyless requests stick together rather than fail)."""
    value = doc.get(field)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return ""
    return str(value)[:256]


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "an empty string" if not value else "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
