"""Feast's Redis online-store format: keys and hash fields to read, values to JSON.

Byte for byte as feast's `infra/key_encoding_utils.py` and `infra/online_stores/redis.py`
(entity key serialization version 3): pure functions, no network.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import mmh3
import orjson
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from extproc.core.feast_proto.Value_pb2 import Value

# Feast's ValueType numbers for the entity key encoding (feast/types/Value.proto).
_STRING, _INT32, _INT64, _BYTES = 2, 3, 4, 1
# Feast writes pandas' NaT as this int64 for a null timestamp.
NULL_TIMESTAMP = -(2**63)
# (value type, length): the header of every name and value in a serialized entity key.
_PAIR = struct.Struct("<II")

JoinValue = str | int | bytes


class FeastValueError(ValueError):
    """A stored value the codec cannot turn into JSON (corrupt bytes, not a feast.types.Value)."""


def serialize_entity_key(join_keys: Sequence[tuple[str, str, JoinValue]]) -> bytes:
    """Feast's `serialize_entity_key`, version 3: `(join key, value type, value)` sorted by join key.

    Value types are Feast's names: `string`, `int64`, `int32`, `bytes`.
    """
    return KeyEncoder([(name, kind) for name, kind, _ in join_keys]).encode({name: v for name, _, v in join_keys})


class KeyEncoder:
    """`serialize_entity_key` for one fixed list of join keys, the part naming them encoded once.

    Version 3 writes the count and every (sorted) join key's name before the values, so
    for a feature view only the values change from one entity to the next.
    """

    __slots__ = ("_head", "_order")

    def __init__(self, join_keys: Sequence[tuple[str, str]]) -> None:
        self._order = tuple(sorted(join_keys, key=lambda k: k[0]))
        head = [struct.pack("<I", len(self._order))]
        for name, _ in self._order:
            encoded = name.encode()
            head.append(_PAIR.pack(_STRING, len(encoded)))
            head.append(encoded)
        self._head = b"".join(head)

    def encode(self, values: Mapping[str, JoinValue]) -> bytes:
        """The serialized entity key of these join-key values (every join key of the list present)."""
        out = [self._head]
        for name, value_type in self._order:
            kind, raw = _key_value_bytes(value_type, values[name])
            out.append(_PAIR.pack(kind, len(raw)))
            out.append(raw)
        return b"".join(out)


def _key_value_bytes(value_type: str, value: JoinValue) -> tuple[int, bytes]:
    if value_type == "string" and isinstance(value, str):
        return _STRING, value.encode()
    if value_type == "int64" and isinstance(value, int):
        return _INT64, struct.pack("<q", value)
    if value_type == "int32" and isinstance(value, int):
        return _INT32, struct.pack("<i", value)
    if value_type == "bytes" and isinstance(value, bytes):
        return _BYTES, value
    raise ValueError(f"a {value_type} join key cannot hold {value!r}")


def redis_key(entity_key: bytes, project: str) -> bytes:
    """The hash Feast keeps one entity's rows of every view in: serialized key, then project."""
    return entity_key + project.encode()


def feature_field(view: str, feature: str) -> bytes:
    """Feast's `_mmh3`: the first 4 bytes of the little-endian unsigned murmur3_32 of `view:feature`."""
    return struct.pack("<I", mmh3.hash(f"{view}:{feature}", signed=False))


def timestamp_field(view: str) -> bytes:
    """The hash field holding the view's event time (a protobuf `Timestamp`)."""
    return b"_ts:" + view.encode()


def event_time(raw: bytes) -> float:
    """Seconds since the epoch of a `_ts:<view>` field."""
    try:
        ts = Timestamp.FromString(raw)
    except DecodeError as exc:
        raise FeastValueError(f"not a protobuf Timestamp: {exc}") from None
    return float(ts.seconds + ts.nanos / 1e9)


def decode_value(raw: bytes) -> Any:
    """A stored `feast.types.Value` as JSON: an empty message (Feast's null) is None."""
    try:
        value = Value.FromString(raw)
    except DecodeError as exc:
        raise FeastValueError(f"not a feast.types.Value: {exc}") from None
    return to_json(value)


def to_json(value: Value) -> Any:
    """The JSON a model expects for each Feast type (README, "Feast": the type table)."""
    kind = value.WhichOneof("val")
    if kind is None or kind == "null_val":
        return None
    field = getattr(value, kind)
    if kind in _SCALARS:
        return _SCALARS[kind](field)
    if kind in _ELEMENTS:  # *_list_val / *_set_val: a message with a repeated `val`
        return [_ELEMENTS[kind](v) for v in field.val]
    if kind in _MESSAGES:
        return _MESSAGES[kind](field)
    raise FeastValueError(f"feast value type {kind!r} has no JSON mapping")


def _map(items: Iterable[tuple[str, Value]]) -> dict[str, Any]:
    return {k: to_json(v) for k, v in items}


def _same(v: Any) -> Any:
    return v


def _bytes(v: bytes) -> str:
    return base64.b64encode(v).decode()


def _json_text(v: str) -> Any:
    """Feast returns JSON features parsed, and the text as is when it does not parse."""
    try:
        return orjson.loads(v)
    except orjson.JSONDecodeError:
        return v


def _utc(v: int) -> str | None:
    return _rfc3339(v, UTC)


def _rfc3339(seconds: int, zone: tzinfo) -> str | None:
    if seconds == NULL_TIMESTAMP:
        return None
    return datetime.fromtimestamp(seconds, tz=zone).isoformat().replace("+00:00", "Z")


def _zone(name: str) -> tzinfo:
    """IANA name or fixed offset (`-07:00`); empty is UTC, as Feast reads it."""
    if not name or name.upper() == "UTC":
        return UTC
    if name[0] in "+-" and len(name) == 6 and name[3] == ":":
        sign = -1 if name[0] == "-" else 1
        return timezone(sign * timedelta(hours=int(name[1:3]), minutes=int(name[4:6])))
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise FeastValueError(f"unknown time zone {name!r}") from None


def _map_key(key: Any) -> str:
    """JSON object keys are strings: a non-string Feast map key is written as its JSON text."""
    kind = key.WhichOneof("key")
    if kind is None:
        return "null"
    raw = getattr(key, kind)
    if kind == "bytes_key":
        return _bytes(raw)
    if kind == "unix_timestamp_key":
        return _utc(raw) or "null"
    return raw if isinstance(raw, str) else orjson.dumps(raw).decode()


_MESSAGES: dict[str, Any] = {
    "map_val": lambda f: _map(f.val.items()),
    "struct_val": lambda f: _map(f.val.items()),
    "map_list_val": lambda f: [_map(m.val.items()) for m in f.val],
    "struct_list_val": lambda f: [_map(m.val.items()) for m in f.val],
    "list_val": lambda f: [to_json(v) for v in f.val],
    "set_val": lambda f: [to_json(v) for v in f.val],
    "scalar_map_val": lambda f: {_map_key(entry.key): to_json(entry.value) for entry in f.val},
    "zoned_timestamp_val": lambda f: _rfc3339(f.unix_timestamp, _zone(f.zone)),
}
_SCALARS: dict[str, Any] = {
    "bytes_val": _bytes,
    "string_val": _same,
    "int32_val": _same,
    "int64_val": _same,
    "double_val": _same,
    "float_val": _same,
    "bool_val": _same,
    "unix_timestamp_val": _utc,
    "json_val": _json_text,
    "uuid_val": _same,
    "time_uuid_val": _same,
    "decimal_val": _same,
}
_ELEMENTS: dict[str, Any] = {
    "bytes_list_val": _bytes,
    "string_list_val": _same,
    "int32_list_val": _same,
    "int64_list_val": _same,
    "double_list_val": _same,
    "float_list_val": _same,
    "bool_list_val": _same,
    "unix_timestamp_list_val": _utc,
    "bytes_set_val": _bytes,
    "string_set_val": _same,
    "int32_set_val": _same,
    "int64_set_val": _same,
    "double_set_val": _same,
    "float_set_val": _same,
    "bool_set_val": _same,
    "unix_timestamp_set_val": _utc,
    "json_list_val": _json_text,
    "uuid_list_val": _same,
    "time_uuid_list_val": _same,
    "uuid_set_val": _same,
    "time_uuid_set_val": _same,
    "decimal_list_val": _same,
    "decimal_set_val": _same,
}
