"""The request body: parse the consumer's JSON, find the entity key, inject features.

Pure functions; each returns a value or a `BrokerError`, never raises on bad input.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

from extproc.errors import BrokerError, ErrorCode

JSONObject = dict[str, Any]

_JSON_TYPES = ("application/json",)

# orjson silently turns integers outside [-2**63, 2**64) into floats, so the model would
# get a different number than the client sent. Such integers have at least 19 digits;
# only bodies with a run that long pay for the exact (stdlib) second look.
_LONG_DIGIT_RUN = re.compile(rb"\d{19}")
_INT_RANGE = range(-(2**63), 2**64)


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


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Iterative, so a hostile document cannot exhaust the Python stack."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, (dict, list)))
    return False


def parse_json_object(raw: bytes, max_depth: int) -> JSONObject | BrokerError:
    """The body must be one UTF-8 JSON object no deeper than `max_depth`."""
    if not raw.strip():
        return BrokerError(ErrorCode.INVALID_JSON, "the request body is empty; send a JSON object")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return BrokerError(ErrorCode.INVALID_JSON, f"the request body is not valid JSON: {exc}")
    if not isinstance(doc, dict):
        return BrokerError(ErrorCode.INVALID_BODY, f"the request body must be a JSON object, not {_kind(doc)}")
    # Counting brackets is C-speed and bounds the depth from above: most bodies stop here.
    if raw.count(b"{") + raw.count(b"[") > max_depth and _depth_exceeds(doc, max_depth):
        return BrokerError(ErrorCode.INVALID_BODY, f"the request body nests deeper than {max_depth} levels")
    if _LONG_DIGIT_RUN.search(raw) and (huge := _integer_out_of_range(raw)):
        return BrokerError(
            ErrorCode.INVALID_BODY, f"an integer ({huge[:40]}) is outside the 64-bit range; send it as a string"
        )
    return doc


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
