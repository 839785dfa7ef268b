"""Shipped objects: one gzip JSON Lines object per spool segment, date and model, read back by byte range.

An object is a run of gzip members of up to `BLOCK_RECORDS` lines each. Concatenated
members are one valid gzip file (RFC 1952 §2.2), so zcat, Athena, DuckDB and pyarrow
read the object whole, while `audit show` fetches and inflates only the member
holding its record (one ranged GET of a few KiB). Compression is deterministic
(zlib, fixed level, gzip header without a timestamp), so re-shipping a segment
writes the same bytes at the same key: item ranges stay true.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from extproc.audit.record import Record

OBJECT_SUFFIX = ".jsonl.gz"
# A member is what `audit show` downloads: small enough to fetch for one record,
# large enough that compression still sees many similar records.
BLOCK_RECORDS = 64
GZIP_LEVEL = 6
# wbits 16 + 15: a gzip wrapper (header with mtime 0, CRC32, size) around raw deflate.
GZIP_WBITS = 31


@dataclass(frozen=True, slots=True)
class Location:
    """Where one record lives: its object, the byte range of its member (HTTP Range form) and its line."""

    key: str
    range: str
    line: int


@dataclass(frozen=True, slots=True)
class PackedObject:
    key: str
    body: bytes
    records: Sequence[Record]
    # Request id → its location in `body`.
    locations: dict[str, Location]


def object_key(prefix: str, date: str, model: str, batch_id: str) -> str:
    """`<prefix>/date=YYYY-MM-DD/model=<model>/<batch>.jsonl.gz`: Hive-style partitions, deterministic per segment."""
    key = f"date={date}/model={model}/{batch_id}{OBJECT_SUFFIX}"
    return f"{prefix.strip('/')}/{key}" if prefix.strip("/") else key


def gzip_member(data: bytes) -> bytes:
    packer = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, GZIP_WBITS)
    return packer.compress(data) + packer.flush()


def pack(key: str, records: Sequence[Record]) -> PackedObject:
    """The object holding `records` in order, and each record's location in it."""
    body = bytearray()
    locations: dict[str, Location] = {}
    for start in range(0, len(records), BLOCK_RECORDS):
        block = records[start : start + BLOCK_RECORDS]
        member = gzip_member(b"".join(orjson.dumps(r) + b"\n" for r in block))
        byte_range = f"bytes={len(body)}-{len(body) + len(member) - 1}"
        for line, record in enumerate(block):
            locations[record["request_id"]] = Location(key, byte_range, line)
        body += member
    return PackedObject(key, bytes(body), records, locations)


def pack_batch(prefix: str, batch_id: str, records: Sequence[Record]) -> list[PackedObject]:
    """A segment's records as one object per (date, model), one record per request id."""
    unique = {r["request_id"]: r for r in records}
    groups: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for record in unique.values():
        groups[record["timestamp"][:10], record["model"]].append(record)
    return [pack(object_key(prefix, date, model, batch_id), group) for (date, model), group in groups.items()]


def record_at(member: bytes, line: int) -> Record | None:
    """The record on `line` of one fetched member; None when the member has no such line."""
    lines = zlib.decompress(member, GZIP_WBITS).splitlines()
    if not 0 <= line < len(lines):
        return None
    record: Record = orjson.loads(lines[line])
    return record
