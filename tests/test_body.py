"""Request-body rules: what is accepted, what is refused and with which code."""

from __future__ import annotations

import orjson
import pytest

from extproc.core.body import check_content_type, entity_key, inject_features, parse_json_object
from extproc.errors import BrokerError, ErrorCode


@pytest.mark.parametrize(
    ("content_type", "accepted"),
    [
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("Application/JSON", True),
        ("application/vnd.acme+json", True),
        ("text/plain", False),
        ("application/x-www-form-urlencoded", False),
        ("", False),
    ],
    ids=["json", "json-charset", "case", "plus-json", "text", "form", "missing"],
)
def test_content_type(content_type: str, accepted: bool) -> None:
    """JSON media types pass; anything else is 415 unsupported_media_type."""
    error = check_content_type(content_type)
    assert (error is None) == accepted
    if error is not None:
        assert error.code is ErrorCode.UNSUPPORTED_MEDIA_TYPE and error.status == 415


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"", ErrorCode.INVALID_JSON),
        (b"   ", ErrorCode.INVALID_JSON),
        (b"{bad", ErrorCode.INVALID_JSON),
        (b'{"a": "\xff"}', ErrorCode.INVALID_JSON),
        (b"[1, 2]", ErrorCode.INVALID_BODY),
        (b'"text"', ErrorCode.INVALID_BODY),
        (b"[" * 40 + b"]" * 40, ErrorCode.INVALID_BODY),
        (b'{"a":' * 40 + b"1" + b"}" * 40, ErrorCode.INVALID_BODY),
        (b"[" * 5000 + b"]" * 5000, ErrorCode.INVALID_JSON),
    ],
    ids=["empty", "blank", "malformed", "invalid-utf8", "array", "string", "deep-array", "deep-object", "absurd"],
)
def test_bad_bodies(raw: bytes, code: ErrorCode) -> None:
    """Each bad body becomes a 400 with its own code, never an exception."""
    result = parse_json_object(raw, max_depth=32)
    assert isinstance(result, BrokerError)
    assert result.code is code and result.status == 400


def test_nesting_at_the_limit_is_accepted() -> None:
    """Depth is counted in containers; exactly the limit passes."""
    raw = b'{"a":' * 31 + b"{}" + b"}" * 31
    assert isinstance(parse_json_object(raw, max_depth=32), dict)


def test_many_flat_brackets_are_not_depth() -> None:
    """A wide document with many small arrays is not deep."""
    raw = orjson.dumps({"rows": [[i] for i in range(100)]})
    assert isinstance(parse_json_object(raw, max_depth=4), dict)


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"customer_id": "c-1"}, "c-1"),
        ({"customer_id": 42}, "42"),
        ({}, ErrorCode.MISSING_ENTITY_KEY),
        ({"customer_id": ""}, ErrorCode.INVALID_ENTITY_KEY),
        ({"customer_id": None}, ErrorCode.INVALID_ENTITY_KEY),
        ({"customer_id": True}, ErrorCode.INVALID_ENTITY_KEY),
        ({"customer_id": 1.5}, ErrorCode.INVALID_ENTITY_KEY),
        ({"customer_id": {"id": 1}}, ErrorCode.INVALID_ENTITY_KEY),
        ({"customer_id": "a\nb"}, ErrorCode.INVALID_ENTITY_KEY),
        ({"customer_id": "x" * 257}, ErrorCode.INVALID_ENTITY_KEY),
    ],
    ids=["string", "int", "missing", "empty", "null", "bool", "float", "object", "newline", "too-long"],
)
def test_entity_key(doc: dict[str, object], expected: str | ErrorCode) -> None:
    """The key is a printable string or an integer; errors name the field."""
    result = entity_key(doc, "customer_id")
    if isinstance(expected, ErrorCode):
        assert isinstance(result, BrokerError) and result.code is expected
        assert "'customer_id'" in result.message
    else:
        assert result == expected


def test_injected_features_replace_the_consumers_copy() -> None:
    """A consumer cannot spoof features: the declared key is overwritten whole."""
    doc = {"customer_id": "c-1", "features": {"income": 1, "vip": True}}
    out = orjson.loads(inject_features(doc, "features", {"income": 52000}))
    assert out == {"customer_id": "c-1", "features": {"income": 52000}}


@pytest.mark.parametrize(
    ("literal", "accepted"),
    [
        (b"-9223372036854775808", True),
        (b"18446744073709551615", True),
        (b"-9223372036854775809", False),
        (b"18446744073709551616", False),
        (b"123456789012345678901234567890", False),
        (b'"123456789012345678901234567890"', True),
    ],
    ids=["int64-min", "uint64-max", "below-int64", "above-uint64", "30-digits", "30-digit-string"],
)
def test_integers_beyond_64_bits_are_refused_not_rounded(literal: bytes, accepted: bool) -> None:
    """orjson would turn them into floats silently; the client gets a 400 instead of a different number."""
    result = parse_json_object(b'{"customer_id": "c-1", "n": ' + literal + b"}", 32)
    if accepted:
        assert isinstance(result, dict) and orjson.dumps(result["n"]) == literal
    else:
        assert isinstance(result, BrokerError) and result.code == ErrorCode.INVALID_BODY
        assert "64-bit" in result.message


BOMB = b'{"customer_id": "c-1", "x": [' + b",".join([b"[]", b"{}"] * 100) + b"]}"


@pytest.mark.parametrize(
    ("raw", "refused", "message"),
    [
        (BOMB, True, "more than 100 objects and arrays"),
        (b'{"x": [' + b",".join([b"1"] * 1_001) + b"]}", True, "more than 1000 elements"),
        (b'{"x": "' + b"[{" * 5_000 + b'"}', False, ""),
        (b'{"x": [' + b",".join([b"[]"] * 98) + b"]}", False, ""),
        (b'{"x": "' + b"," * 999 + b'"}', False, ""),
    ],
    ids=["container-bomb", "too-many-elements", "brackets-in-a-string", "at-the-limit", "commas-under-the-limit"],
)
def test_structure_limits(raw: bytes, refused: bool, message: str) -> None:
    """Too many containers or elements is a 400 naming the limit; brackets inside strings are not containers."""
    result = parse_json_object(raw, 32, max_containers=100, max_elements=1_000)
    if refused:
        assert isinstance(result, BrokerError) and result.code is ErrorCode.INVALID_BODY and result.status == 400
        assert message in result.message
    else:
        assert isinstance(result, dict), result
