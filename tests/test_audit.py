"""The audit trail's pure parts, the spool and the shipper to local files: no Envoy, no AWS."""

from __future__ import annotations

import copy
import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.adapters.aws_audit import dynamo_item, from_dynamo_item
from extproc.audit import carried
from extproc.audit.local import LocalAuditStore
from extproc.audit.objects import Location
from extproc.audit.record import (
    REDACTED,
    AuditDraft,
    AuditTrail,
    RecordContext,
    build_record,
    compile_redaction,
    iso_utc,
    parse_when,
    redact,
    response_error_code,
    summary,
)
from extproc.audit.shipper import Shipper, ShipTiming, next_backoff
from extproc.audit.spool import Spool, parse_lines
from extproc.registry import RegistryInvalid, parse_registry
from tests.test_registry import BASE

RULES = compile_redaction(["ssn", "contact.email"])


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"ssn": "1", "a": 2}, {"ssn": REDACTED, "a": 2}),
        ({"contact": {"email": "x", "phone": "y"}}, {"contact": {"email": REDACTED, "phone": "y"}}),
        ({"email": "top-level email is not contact.email"}, {"email": "top-level email is not contact.email"}),
        ({"deep": {"contact": {"email": "x"}}}, {"deep": {"contact": {"email": REDACTED}}}),
        ({"rows": [{"ssn": "1"}, {"ssn": "2"}]}, {"rows": [{"ssn": REDACTED}, {"ssn": REDACTED}]}),
        ({"ssn": {"nested": "whole subtree"}}, {"ssn": REDACTED}),
        ([1, "ssn"], [1, "ssn"]),
        (None, None),
    ],
    ids=["top", "nested-path", "path-needs-parent", "any-depth", "in-lists", "subtree", "values-untouched", "null"],
)
def test_redaction(value: Any, expected: Any) -> None:
    """A rule removes the value of every key whose path ends with it, at any depth, and nothing else."""
    original = copy.deepcopy(value)
    assert redact(value, RULES) == expected
    assert value == original  # the caller's document is not modified


def draft(**changes: Any) -> AuditDraft:
    base = AuditDraft(
        "credit-risk",
        1_790_000_000.25,
        request_sha256="aa",
        input={"customer_id": "c-1", "ssn": "123"},
        entity_key="c-1",
        features={"income": 5},
        feature_status="ok",
    )
    for name, value in changes.items():
        setattr(base, name, value)
    return base


WHERE = RecordContext("req-1", "credit-risk", "v2", "reg-7", "customer", "customer_id", [("route", 0.001)])


def test_record_of_a_served_request() -> None:
    """The record carries ids, version, input, features, answer, hashes and latency, with redaction applied."""
    body = b'{"score": 0.5, "ssn": "123"}'
    record = build_record(draft(), WHERE, 200, body, RULES)
    assert record["request_id"] == "req-1"
    assert record["timestamp"] == "2026-09-21T14:13:20.250000Z"
    assert (record["model"], record["version"], record["registry_version"]) == ("credit-risk", "v2", "reg-7")
    assert record["entity"] == {"name": "customer", "key": "c-1"}
    assert record["input"] == {"customer_id": "c-1", "ssn": REDACTED}
    assert record["features"] == {"income": 5}
    assert record["response"] == {"status": 200, "body": {"score": 0.5, "ssn": REDACTED}}
    assert record["sha256"] == {"request": "aa", "response": hashlib.sha256(body).hexdigest()}
    assert record["latency_ms"] == {"route": 1.0, "total": 1.0}
    assert record["error_code"] is None


@pytest.mark.parametrize(
    ("status", "body", "error_code", "expected"),
    [
        (400, b'{"error": {"code": "missing_entity_key"}}', None, "missing_entity_key"),
        (503, b'{"error": {"code": "upstream_unavailable"}}', None, "upstream_unavailable"),
        (400, b'{"error": "bad input"}', None, "http_400"),
        (500, b"not json", None, "http_500"),
        (None, b"", None, "incomplete"),
        (404, b"{}", "unknown_entity", "unknown_entity"),
        (200, b"{}", None, None),
    ],
    ids=["broker-error", "envoy-error", "model-error", "not-json", "no-response", "broker-decided", "ok"],
)
def test_failed_executions_have_an_error_code(
    status: int | None, body: bytes, error_code: str | None, expected: str | None
) -> None:
    """Failures are recorded with the code the client saw, or http_<status>, or `incomplete`."""
    record = build_record(draft(error_code=error_code), WHERE, status, body, compile_redaction([]))
    assert record["error_code"] == expected
    assert record["response"]["status"] == status


def test_unparsed_bodies_are_never_stored() -> None:
    """A body that is not JSON could not be redacted: only its hash is kept."""
    record = build_record(draft(input=None), WHERE, 502, b"ssn=123", RULES)
    assert record["response"]["body"] is None
    assert record["sha256"]["response"]


def test_redacted_join_key_hides_the_entity_key() -> None:
    """Redacting the join key also hides the entity key the record carries beside the input."""
    record = build_record(draft(), WHERE, 200, b"{}", compile_redaction(["customer_id"]))
    assert record["entity"]["key"] == REDACTED
    assert record["input"]["customer_id"] == REDACTED


def test_dynamo_item_round_trip() -> None:
    """The summary survives DynamoDB's typed attributes; nulls are left out, numbers stay numbers."""
    meta = summary(build_record(draft(), WHERE, 200, b"{}", compile_redaction([])))
    item = dynamo_item(meta, Location("k", "bytes=10-99", 3))
    assert item["status"] == {"N": "200"} and item["request_id"] == {"S": "req-1"}
    assert "parent_request_id" not in item
    back = from_dynamo_item(item)
    where = {"s3_key": "k", "s3_range": "bytes=10-99", "s3_line": 3}
    assert back == {**{k: v for k, v in meta.items() if v is not None}, **where}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-01-31", "2026-01-31T00:00:00.000000Z"),
        ("2026-01-31T12:30:00Z", "2026-01-31T12:30:00.000000Z"),
        ("2026-01-31T12:30:00+02:00", "2026-01-31T10:30:00.000000Z"),
        ("90s", "2026-01-31T11:58:30.000000Z"),
        ("2h", "2026-01-31T10:00:00.000000Z"),
        ("1d", "2026-01-30T12:00:00.000000Z"),
        ("yesterday", None),
        ("5w", None),
        ("", None),
    ],
    ids=["date", "utc", "offset", "seconds", "hours", "days", "word", "weeks", "empty"],
)
def test_parse_when(text: str, expected: str | None) -> None:
    """--since/--until accept ISO dates and times or an age; anything else is refused."""
    now = 1_769_860_800.0  # 2026-01-31T12:00:00Z
    assert parse_when(text, now) == expected


def test_response_error_code_ignores_success() -> None:
    """A 2xx or 3xx response has no error code whatever its body says."""
    assert response_error_code(200, {"error": {"code": "x"}}) is None


AUDIT = {"spool": {"dir": "s"}, "sink": {"local": {"dir": "l"}}}


@pytest.mark.parametrize(
    ("audit", "expected"),
    [
        ({**AUDIT, "sink": {}}, "audit.sink: Value error, declare exactly one of 'local' or 'aws'"),
        (
            {**AUDIT, "sink": {"local": {"dir": "l"}, "aws": {"bucket": "b-1", "table": "t-1"}}},
            "audit.sink: Value error, declare exactly one of",
        ),
        (
            {**AUDIT, "sink": {"aws": {"bucket": "Bad_Bucket", "table": "t-1"}}},
            "audit.sink.aws.bucket: should be an S3 bucket",
        ),
        (
            {**AUDIT, "sink": {"aws": {"bucket": "b-1", "table": "t-1", "endpoint_url": "localhost:5000"}}},
            "audit.sink.aws.endpoint_url: should be an http:// or https:// URL",
        ),
        ({**AUDIT, "spool": {"dir": "s", "when_full": "block"}}, "audit.spool.when_full: Input should be"),
        ({**AUDIT, "spool": {"dir": "s", "max_bytes": 10}}, "audit.spool.max_bytes: Input should be greater"),
        ({**AUDIT, "spool": {}}, "audit.spool.dir: Field required"),
        ({**AUDIT, "redact": ["a..b"]}, "audit.redact[0]: should be a field path"),
        (
            {**AUDIT, "spool": {"dir": "s", "max_bytes": 8192, "segment_bytes": 8192}},
            "audit.spool.segment_bytes: must not exceed each worker's share of max_bytes (4096 bytes for 2 workers)",
        ),
        ({**AUDIT, "colour": "red"}, "audit.colour: Extra inputs are not permitted"),
    ],
    ids=[
        "no-sink",
        "two-sinks",
        "bucket-name",
        "endpoint-scheme",
        "bad-policy",
        "tiny-spool",
        "no-spool-dir",
        "bad-path",
        "segment-over-share",
        "unknown-key",
    ],
)
def test_bad_audit_config_names_the_field(audit: dict[str, Any], expected: str) -> None:
    """Each audit-section mistake is reported at its field path."""
    with pytest.raises(RegistryInvalid) as caught:
        parse_registry({**BASE, "audit": audit})
    found = [str(p) for p in caught.value.problems]
    assert any(p.startswith(expected) for p in found), found


def test_model_audit_without_section_is_refused() -> None:
    """`models[].audit: true` with no audit section is an error, not a silently unaudited model."""
    doc = copy.deepcopy(BASE)
    doc["models"][0]["audit"] = True
    with pytest.raises(RegistryInvalid) as caught:
        parse_registry(doc)
    assert [str(p) for p in caught.value.problems] == [
        "models[0].audit: audit is on but the registry has no 'audit' section"
    ]


def test_audit_defaults_and_per_model_override() -> None:
    """The section audits every model by default; a model can opt out."""
    doc = {**copy.deepcopy(BASE), "audit": AUDIT}
    assert parse_registry(doc).audited(parse_registry(doc).models[0])
    doc["models"][0]["audit"] = False
    reg = parse_registry(doc)
    assert not reg.audited(reg.models[0])
    assert reg.audit is not None and reg.audit.spool.when_full == "fail_closed"


def line(n: int, size: int = 100) -> bytes:
    """A spool line of exactly `size` bytes."""
    head = orjson.dumps({"request_id": f"r-{n}", "pad": ""})
    return head[:-2] + b"x" * (size - len(head) - 1) + head[-2:] + b"\n"


def spool_files(directory: Path, suffix: str) -> list[Path]:
    return sorted(directory.glob("*" + suffix))


def test_segments_rotate_at_size_and_seal(tmp_path: Path) -> None:
    """A segment that reaches segment_bytes is closed; sealing renames it .jsonl with every line intact."""
    spool = Spool(tmp_path, max_bytes=10_000, segment_bytes=250)
    spool.open()
    for n in range(5):
        assert spool.append(line(n))
    Spool.seal(spool.take_rotated())
    sealed = spool_files(tmp_path, ".jsonl")
    assert len(sealed) == 1 and len(spool_files(tmp_path, ".open")) == 1
    assert [r["request_id"] for r in parse_lines(sealed[0].read_bytes())[0]] == ["r-0", "r-1", "r-2"]
    assert spool.used == sum(p.stat().st_size for p in tmp_path.iterdir())


def test_old_segment_is_sealed_by_age(tmp_path: Path) -> None:
    """A quiet segment becomes shippable after seal_after, not only when full."""
    now = [0.0]
    spool = Spool(tmp_path, max_bytes=10_000, segment_bytes=10_000, clock=lambda: now[0])
    spool.open()
    spool.append(line(1))
    spool.rotate_if_older(2.0)
    assert spool.take_rotated() == []
    now[0] = 2.5
    spool.rotate_if_older(2.0)
    Spool.seal(spool.take_rotated())
    assert len(spool_files(tmp_path, ".jsonl")) == 1


def test_spool_bound_refuses_and_writes_nothing(tmp_path: Path) -> None:
    """A record that would pass max_bytes is refused whole; the directory never exceeds the bound."""
    spool = Spool(tmp_path, max_bytes=450, segment_bytes=1000)
    spool.open()
    assert [spool.append(line(n)) for n in range(6)] == [True, True, True, True, False, False]
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) == 400


def test_leftovers_of_a_killed_process_are_sealed_and_counted(tmp_path: Path) -> None:
    """On open, an `.open` segment from a dead process is sealed for shipping and counts toward the bound."""
    first = Spool(tmp_path, max_bytes=10_000, segment_bytes=10_000)
    first.open()
    first.append(line(1))
    second = Spool(tmp_path, max_bytes=10_000, segment_bytes=10_000)
    second.open()
    assert len(spool_files(tmp_path, ".jsonl")) == 1 and second.used == 100


def test_torn_last_line_is_skipped() -> None:
    """A half-written final line (power loss) is counted and skipped; the rest is read."""
    records, torn = parse_lines(line(1) + b'{"request_id": "r-2", "pa')
    assert [r["request_id"] for r in records] == ["r-1"] and torn == 1


def test_backoff_doubles_to_a_cap() -> None:
    """Retries back off exponentially and stop growing at the cap."""
    waits = [0.0]
    for _ in range(10):
        waits.append(next_backoff(waits[-1]))
    assert waits[1:4] == [0.2, 0.4, 0.8] and waits[-1] == 10.0


def audit_trail(spool: Spool, rules: list[str] | None = None, fail_closed: bool = True) -> AuditTrail:
    return AuditTrail(
        spool,
        entities={"credit-risk": ("customer", "customer_id")},
        redact_paths=rules or [],
        registry_version="r",
        fail_closed=fail_closed,
    )


async def test_shipping_to_local_files_is_idempotent(tmp_path: Path) -> None:
    """Shipped segments leave the spool; shipping the same segment again adds no duplicate line."""
    spool = Spool(tmp_path / "spool", max_bytes=100_000, segment_bytes=100_000)
    spool.open()
    trail = audit_trail(spool, ["ssn"])
    for n in range(3):
        written = trail.write(
            draft(), request_id=f"r-{n}", route="credit-risk", version="v1", stages=[], status=200, body=b"{}"
        )
        assert written
    spool.rotate()
    store = LocalAuditStore(tmp_path / "records")
    shipper = Shipper(spool, store, ShipTiming(interval_s=1, seal_after_s=1, fsync_interval_s=1))
    await shipper.seal()
    (segment,) = spool.sealed()
    kept = segment.read_bytes()
    assert await shipper.ship(0.0)
    assert list(spool.sealed()) == [] and spool.used == 0
    segment.write_bytes(kept)  # as if the process died after shipping, before deleting
    assert await shipper.ship(0.0)
    listed = store.by_model("credit-risk", "2000-01-01", "2100-01-01")
    assert [s["request_id"] for s in listed] == ["r-0", "r-1", "r-2"]
    shown = store.show("r-1")
    assert shown is not None and shown["input"]["ssn"] == REDACTED
    assert b"123" not in b"".join(p.read_bytes() for p in (tmp_path / "records").rglob("*.jsonl"))


def test_drop_policy_answers_and_fail_closed_refuses(tmp_path: Path) -> None:
    """When the spool is full, `drop` lets the response go and `fail_closed` does not."""
    results = {}
    for policy in (True, False):
        spool = Spool(tmp_path / str(policy), max_bytes=4096, segment_bytes=4096)
        spool.open()
        trail = audit_trail(spool, fail_closed=policy)
        big = AuditDraft("credit-risk", 0.0, input={"pad": "x" * 5000})
        results[policy] = trail.write(big, request_id="r", route="m", version=None, stages=[], status=200, body=b"")
        assert spool.used == 0
    assert results == {True: False, False: True}


@given(st.floats(min_value=0, max_value=4e9))
def test_timestamps_are_datetimes_own_rendering(epoch: float) -> None:
    """The fast formatter rounds to the microsecond exactly as datetime does (records sort by it)."""
    assert iso_utc(epoch) == datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_a_carried_draft_comes_back_exactly() -> None:
    """Over http_service the draft rides in Envoy's metadata: numbers keep their type and digits."""
    draft = AuditDraft(
        "credit-risk",
        1764000000.123456,
        request_sha256="ab" * 32,
        input={"id": 2**60 + 1, "amount": 1.0, "tags": ["a", None]},
        entity_key="c-1",
        features={"income": 46500, "ratio": 0.041},
        feature_status="ok",
        consumer="acme",
        rule={"segment": "high", "pinned": "v2"},
    )
    found = carried.unpack(carried.pack(draft, [("route", 1e-05), ("body", 0.0002)], 1764000000.5))
    assert isinstance(found, carried.Carried)
    assert found.draft == draft
    assert isinstance(found.draft.input["amount"], float) and found.draft.input["id"] == 2**60 + 1
    assert found.stages == [("route", 1e-05), ("body", 0.0002)]
    assert found.answered_at == 1764000000.5


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "not a JSON object"),
        ("[1]", "not a JSON object"),
        ("{", "does not read"),
        ('{"model": "m"}', "does not read"),
        ('{"model": "m", "started_at": 1, "stages": [], "answered_at": 2, "extra": 1}', "does not read"),
    ],
)
def test_a_mangled_carried_draft_says_so(value: object, expected: str) -> None:
    found = carried.unpack(value)
    assert isinstance(found, str) and expected in found
