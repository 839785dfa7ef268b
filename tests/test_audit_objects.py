"""Shipped objects (one gzip JSON Lines object per segment), the documented schema and the spool's backpressure."""

from __future__ import annotations

import gzip
import re
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from extproc.audit import (
    FIELDS,
    REDACTED,
    SCHEMA_VERSION,
    LocalAuditStore,
    Shipper,
    ShipTiming,
    Spool,
    compile_redaction,
    half_full_message,
    object_key,
    pack_batch,
    record_at,
    rollout_record,
    shadow_record,
    ship_counters,
    spool_status,
    summary,
)

README = Path(__file__).resolve().parent.parent / "README.md"


def sample(name: str) -> float:
    value = REGISTRY.get_sample_value(name)
    return 0.0 if value is None else value


def rec(n: int, model: str = "credit-risk", day: str = "2026-12-02") -> dict[str, Any]:
    return {"request_id": f"r-{n}", "timestamp": f"{day}T07:00:00.{n:06d}Z", "model": model, "input": {"n": n}}


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("audit", "audit/date=2026-12-02/model=credit-risk/seg.jsonl.gz"),
        ("a/b/", "a/b/date=2026-12-02/model=credit-risk/seg.jsonl.gz"),
        ("", "date=2026-12-02/model=credit-risk/seg.jsonl.gz"),
    ],
    ids=["prefix", "trailing-slash", "no-prefix"],
)
def test_object_key_layout(prefix: str, expected: str) -> None:
    """Keys are deterministic: Hive-style date and model partitions, the segment as the name."""
    assert object_key(prefix, "2026-12-02", "credit-risk", "seg") == expected


def test_a_segment_becomes_one_object_per_date_and_model_without_duplicates() -> None:
    """Records split by (date, model); a request id seen twice in a segment is stored once."""
    records = [rec(n, model=f"m{n % 2}", day=f"2026-12-0{1 + n % 3}") for n in range(60)]
    objects = pack_batch("audit", "seg", [*records, *records[:5]])
    assert len(objects) == 6
    assert sorted(r["request_id"] for o in objects for r in o.records) == sorted(r["request_id"] for r in records)
    for packed in objects:
        assert {f"date={r['timestamp'][:10]}/model={r['model']}/" for r in packed.records} == {
            packed.key.split("/", 1)[1].rsplit("/", 1)[0] + "/"
        }


def test_every_record_is_one_ranged_read_away() -> None:
    """The byte range and line of each location hold exactly that record; the whole object is one gzip stream."""
    records = [rec(n) for n in range(200)]
    (packed,) = pack_batch("audit", "seg", records)
    for request_id, where in packed.locations.items():
        first, last = (int(n) for n in where.range.removeprefix("bytes=").split("-"))
        found = record_at(packed.body[first : last + 1], where.line)
        assert found is not None and found["request_id"] == request_id
    assert len({w.range for w in packed.locations.values()}) > 1  # several members, not one per object
    assert gzip.decompress(packed.body).splitlines() == [orjson.dumps(r) for r in records]
    assert record_at(packed.body, 10_000) is None


def test_packing_is_deterministic() -> None:
    """Re-shipping a segment writes the very same bytes, so the items' ranges stay true."""
    records = [rec(n) for n in range(100)]
    assert pack_batch("audit", "seg", records)[0].body == pack_batch("audit", "seg", records)[0].body


@pytest.mark.parametrize(
    ("was_above", "used", "logged", "now_above"),
    [
        (False, 400, None, False),
        (False, 600, "past half", True),
        (True, 700, None, True),
        (True, 300, "back under half", False),
    ],
    ids=["below", "crossing-up", "still-above", "crossing-down"],
)
def test_half_bound_is_logged_once_per_crossing(
    was_above: bool, used: int, logged: str | None, now_above: bool
) -> None:
    """A line when the spool crosses half its bound, either way, and none while it stays on one side."""
    above, message = half_full_message(was_above, used, 1000)
    assert above == now_above
    assert (message is None) if logged is None else (message is not None and logged in message)


def test_segment_names_never_collide_across_spools(tmp_path: Path) -> None:
    """Two spools (two brokers) starting segments in the same millisecond still name them differently."""
    names = set()
    for n in range(2):
        spool = Spool(tmp_path / str(n), max_bytes=10_000, segment_bytes=10_000)
        spool.open()
        spool.append(b'{"request_id": "r"}\n')
        (path,) = (tmp_path / str(n)).iterdir()
        names.add(path.name)
    assert len(names) == 2


def test_spool_status_reports_depth_and_oldest_unshipped(tmp_path: Path) -> None:
    """`audit status` counts bytes and segments per worker and ages the oldest by its name."""
    spool = Spool(tmp_path / "worker-9001", max_bytes=10_000, segment_bytes=40)
    spool.open()
    for _ in range(3):
        spool.append(b'{"request_id": "r", "pad": "xxxxxxxxxxx"}\n')
    Spool.seal(spool.take_rotated())
    (tmp_path / "worker-9002").mkdir()
    oldest = spool.oldest()
    assert oldest is not None and abs(oldest - time.time()) < 60
    status = spool_status(tmp_path, 20_000, now=oldest + 5)
    assert status["bytes"] == spool.used and status["max_bytes"] == 20_000
    assert status["oldest_unshipped_seconds"] == 5.0
    busy, idle = status["workers"]
    assert (busy["segments"], busy["sealed"], busy["bytes"]) == (3, 3, spool.used)
    assert idle == {"worker": "worker-9002", "bytes": 0, "segments": 0, "sealed": 0, "oldest_unshipped_seconds": None}


async def test_shipper_reports_failures_then_shipped_records_and_depth(tmp_path: Path) -> None:
    """A sink that refuses counts a failure and keeps the bytes; once it takes them, records shipped, depth 0."""
    spool = Spool(tmp_path / "spool", max_bytes=100_000, segment_bytes=100_000)
    spool.open()
    for n in range(4):
        spool.append(orjson.dumps(rec(n)) + b"\n")
    blocked = tmp_path / "records"
    blocked.write_text("a file where the sink needs a directory")
    shipped, failures = sample("model_broker_audit_shipped_total"), sample("model_broker_audit_ship_failures_total")
    shipper = Shipper(spool, LocalAuditStore(blocked), ShipTiming(interval_s=1, seal_after_s=0, fsync_interval_s=1))
    await shipper.step(0.0)
    assert sample("model_broker_audit_ship_failures_total") == failures + 1
    assert sample("model_broker_audit_spool_bytes") == spool.used > 0
    assert sample("model_broker_audit_oldest_unshipped_seconds") >= 0
    blocked.unlink()
    await shipper.step(100.0)  # past the backoff
    assert spool.used == 0 and sample("model_broker_audit_spool_bytes") == 0
    assert sample("model_broker_audit_shipped_total") == shipped + 4
    assert sample("model_broker_audit_oldest_unshipped_seconds") == 0


def test_counters_are_read_from_the_metrics_text() -> None:
    """`audit status` sums the audit counters out of the broker's Prometheus text."""
    text = (
        "# TYPE model_broker_audit_shipped_total counter\nmodel_broker_audit_shipped_total 1200.0\n"
        "# TYPE model_broker_audit_ship_failures_total counter\nmodel_broker_audit_ship_failures_total 3.0\n"
        '# TYPE model_broker_audit_dropped_total counter\nmodel_broker_audit_dropped_total{model="a"} 2.0\n'
        'model_broker_audit_dropped_total{model="b"} 1.0\n'
    )
    counters = ship_counters(text_string_to_metric_families(text))
    assert counters == {"shipped_records": 1200.0, "ship_failures": 3.0, "dropped_records": 3.0}


def test_readme_documents_every_field_of_the_schema() -> None:
    """The README's schema table lists exactly the fields, types and versions of `audit.fields`."""
    text = README.read_text()
    section = text[text.index("<!-- audit-schema -->") : text.index("<!-- /audit-schema -->")]
    rows = re.findall(r"^\| `([^`]+)` \| (\w+)(\??) \| (\d+) \|", section, flags=re.MULTILINE)
    assert rows == [(f.path, f.type, "?" if f.nullable else "", str(f.since)) for f in FIELDS]
    assert f"schema version {SCHEMA_VERSION}" in section


def test_rollout_and_shadow_records_share_the_trail_and_its_summary() -> None:
    """Rollout and shadow records carry their kind, a stable id and the model's partition; summaries fit every kind."""
    event = rollout_record("rollback", "credit-risk", "rollback", {"revision": 7, "reason": "error_rate"}, 1.7e9)
    assert (event["kind"], event["model"], event["rollout"]["reason"]) == ("rollout", "credit-risk", "error_rate")
    assert event["request_id"] == "rollout:credit-risk:1700000000000:7"
    comparison = {
        "request_id": "req-9",
        "model": "credit-risk",
        "primary_version": "v1",
        "shadow_version": "v3",
        "field": "score",
        "match": False,
        "abs_diff": 0.25,
        "primary": {"score": 0.5, "contact": {"email": "a@b"}},
        "shadow": {"score": 0.25},
    }
    shadow = shadow_record(comparison, compile_redaction(["contact.email"]), 1.7e9)
    assert (shadow["request_id"], shadow["parent_request_id"], shadow["version"]) == ("shadow:req-9", "req-9", "v1")
    assert shadow["shadow"]["primary"]["contact"]["email"] == REDACTED and shadow["shadow"]["version"] == "v3"
    (packed,) = pack_batch("audit", "seg", [event, shadow])
    assert packed.key.startswith("audit/date=2023-11-14/model=credit-risk/")
    kinds = {summary(r)["kind"]: summary(r) for r in (event, shadow)}
    assert kinds["rollout"]["event"] == "rollback" and kinds["rollout"]["status"] is None
    assert kinds["shadow"]["parent_request_id"] == "req-9"
    assert summary({"request_id": "old", "timestamp": "t", "model": "m"})["kind"] == "execution"  # schema 1
