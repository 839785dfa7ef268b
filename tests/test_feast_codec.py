"""Feast's Redis format, pure: keys and fields byte for byte as the feast SDK makes them, values to JSON."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from extproc.core.feast_codec import (
    NULL_TIMESTAMP,
    FeastValueError,
    decode_value,
    feature_field,
    redis_key,
    serialize_entity_key,
    timestamp_field,
)
from extproc.core.feast_proto.Value_pb2 import (
    BoolList,
    BytesSet,
    DoubleList,
    FloatList,
    Int64List,
    Map,
    RepeatedValue,
    StringList,
    Value,
    ZonedTimestamp,
)
from extproc.core.feast_read import FeastView, ReadPlan
from extproc.core.features import FeatureRow

KEYS = [
    [("customer_id", "int64", 1001)],
    [("customer_id", "int64", 2**53 + 1)],
    [("customer_id", "int64", -(2**63))],
    [("driver", "string", "d-7")],
    [("driver", "string", "é✓")],
    [("n", "int32", -5)],
    [("merchant_id", "string", "m-1"), ("customer_id", "int64", 42)],
    [("b", "string", "x"), ("a", "int64", 1), ("c", "int32", 2)],
]
FIELDS = [("customer_stats", "txn_count"), ("v", "f"), ("driver_hourly_stats", "conv_rate"), ("é", "✓")]

# Run in the Feast venv: Feast's own functions on the same inputs.
FEAST_SIDE = """
import json, sys
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import _mmh3, _redis_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value
keys, fields = json.load(sys.stdin)
FIELD = {"string": "string_val", "int64": "int64_val", "int32": "int32_val"}
def value(kind, v):
    return Value(**{FIELD[kind]: v})
def entity(key):
    return EntityKey(join_keys=[k for k, _, _ in key], entity_values=[value(t, v) for _, t, v in key])
out = {
    "keys": [_redis_key("proj", entity(key), 3).hex() for key in keys],
    "fields": [_mmh3(f"{v}:{f}").hex() for v, f in fields],
}
json.dump(out, sys.stdout)
"""


def test_keys_and_fields_match_feast(feast_python: Path) -> None:
    """Entity keys (composite ones sorted), project suffix and murmur3 fields equal Feast's own, byte for byte."""
    out = subprocess.run(
        [str(feast_python), "-P", "-c", FEAST_SIDE],
        input=json.dumps([KEYS, FIELDS]),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    feast = json.loads(out.stdout)
    assert [redis_key(serialize_entity_key(key), "proj").hex() for key in KEYS] == feast["keys"]
    assert [feature_field(v, f).hex() for v, f in FIELDS] == feast["fields"]


def ts(seconds: int) -> bytes:
    return bytes(Timestamp(seconds=seconds).SerializeToString())


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (Value(int64_val=2**62 + 1), 2**62 + 1),
        (Value(int32_val=-3), -3),
        (Value(double_val=0.1), 0.1),
        (Value(float_val=0.3), 0.30000001192092896),
        (Value(string_val="gold"), "gold"),
        (Value(bool_val=False), False),
        (Value(bytes_val=b"\x00\xff"), "AP8="),
        (Value(unix_timestamp_val=1_700_000_000), "2023-11-14T22:13:20Z"),
        (Value(unix_timestamp_val=NULL_TIMESTAMP), None),
        (Value(), None),
        (Value(int64_list_val=Int64List(val=[1, 2**60])), [1, 2**60]),
        (Value(double_list_val=DoubleList(val=[])), []),
        (Value(float_list_val=FloatList(val=[0.5])), [0.5]),
        (Value(string_list_val=StringList(val=["a", "b"])), ["a", "b"]),
        (Value(bool_list_val=BoolList(val=[True])), [True]),
        (Value(unix_timestamp_list_val=Int64List(val=[0, NULL_TIMESTAMP])), ["1970-01-01T00:00:00Z", None]),
        (Value(bytes_set_val=BytesSet(val=[b"x"])), ["eA=="]),
        (Value(json_val='{"a": [1, 2]}'), {"a": [1, 2]}),
        (Value(map_val=Map(val={"k": Value(int64_val=1)})), {"k": 1}),
        (Value(list_val=RepeatedValue(val=[Value(int64_list_val=Int64List(val=[1]))])), [[1]]),
        (Value(zoned_timestamp_val=ZonedTimestamp(unix_timestamp=0, zone="+02:00")), "1970-01-01T02:00:00+02:00"),
        (Value(decimal_val="1.10"), "1.10"),
    ],
    ids=lambda v: v.WhichOneof("val") or "empty" if isinstance(v, Value) else None,
)
def test_value_to_json(value: Value, expected: Any) -> None:
    """Each Feast type arrives as the JSON the README's type table promises."""
    got = decode_value(value.SerializeToString())
    assert got == expected
    assert type(got) is type(expected)


def test_corrupt_value_is_an_error() -> None:
    """Bytes that are not a feast.types.Value are refused, never guessed."""
    with pytest.raises(FeastValueError):
        decode_value(b"\xff\xff\xff")


VIEWS = {
    "stats": FeastView("stats", (("customer_id", "int64"),), ttl_seconds=60),
    "pair": FeastView("pair", (("customer_id", "int64"), ("merchant_id", "string"))),
}
PLAN = ReadPlan("p", VIEWS, ("stats:a", "stats:b", "pair:n"))
VALUE_1 = Value(int64_val=1).SerializeToString()


def test_plan_sends_one_hmget_per_view() -> None:
    """Each view gets its own key (its join keys only) and its fields plus its `_ts`."""
    commands = PLAN.commands((("customer_id", 7), ("merchant_id", "m")))
    assert commands == [
        (
            redis_key(serialize_entity_key([("customer_id", "int64", 7)]), "p"),
            (feature_field("stats", "a"), feature_field("stats", "b"), timestamp_field("stats")),
        ),
        (
            redis_key(serialize_entity_key([("customer_id", "int64", 7), ("merchant_id", "string", "m")]), "p"),
            (feature_field("pair", "n"), timestamp_field("pair")),
        ),
    ]


@pytest.mark.parametrize(
    ("replies", "expected"),
    [
        (
            [[VALUE_1, b"", ts(990)], [VALUE_1, ts(0)]],
            FeatureRow({"stats:a": 1, "stats:b": None, "pair:n": 1}, fresh_until=1050.0),
        ),
        (
            [[VALUE_1, None, ts(990)], [None, None]],
            FeatureRow(
                {"stats:a": 1, "stats:b": None, "pair:n": None},
                {"stats:b": "missing", "pair:n": "missing"},
                fresh_until=1050.0,
            ),
        ),
        (
            [[VALUE_1, VALUE_1, ts(900)], [VALUE_1, ts(0)]],
            FeatureRow({"stats:a": None, "stats:b": None, "pair:n": 1}, {"stats:a": "stale", "stats:b": "stale"}),
        ),
        (
            [[VALUE_1, VALUE_1, ts(940)], [VALUE_1, ts(0)]],
            FeatureRow({"stats:a": 1, "stats:b": 1, "pair:n": 1}, {}, 1000.0),
        ),
        (
            [[VALUE_1, VALUE_1, b"\xff"], [VALUE_1, ts(0)]],
            FeatureRow({"stats:a": None, "stats:b": None, "pair:n": 1}, {"stats:a": "stale", "stats:b": "stale"}),
        ),
        ([[None, None, None], [None, None]], None),
    ],
    ids=["present-and-null", "missing", "stale-past-ttl", "at-ttl", "unreadable-ts", "unknown-entity"],
)
def test_plan_rows(replies: list[list[bytes | None]], expected: FeatureRow | None) -> None:
    """Absent field: missing; empty value: Feast's null; `_ts` older than the view's TTL: stale; nothing: unknown.

    A row is fresh until its first view with a max age reaches it (`fresh_until`; inf without one).
    """
    assert PLAN.row(replies, now=1000.0) == expected
