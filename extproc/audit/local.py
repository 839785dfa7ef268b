"""The embedded audit sink: JSONL files on local disk, and the reader `audit show|list` uses.

Layout: `<dir>/date=YYYY-MM-DD/model=<model>/<segment>.jsonl`, one file per
shipped spool segment, date and model. Each file is written whole and renamed
into place, so re-shipping a segment replaces its files instead of adding lines.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from extproc.audit.record import AuditSinkUnavailable, Record, summary
from extproc.audit.spool import parse_lines


def local_path(directory: Path, batch_id: str, record: Record) -> Path:
    return directory / f"date={record['timestamp'][:10]}" / f"model={record['model']}" / f"{batch_id}.jsonl"


class LocalAuditStore:
    def __init__(self, directory: Path) -> None:
        self._dir = directory

    def put(self, batch_id: str, records: Sequence[Record]) -> None:
        files: dict[Path, list[Record]] = defaultdict(list)
        for record in records:
            files[local_path(self._dir, batch_id, record)].append(record)
        try:
            for path, group in files.items():
                _write_whole(path, b"".join(orjson.dumps(r) + b"\n" for r in group))
        except OSError as exc:
            raise AuditSinkUnavailable(f"local audit files: {exc}") from None

    def close(self) -> None:
        return None

    def show(self, request_id: str) -> Record | None:
        wanted = request_id.encode()
        for path in self._dir.glob("date=*/model=*/*.jsonl"):
            data = path.read_bytes()
            if wanted in data:  # parse only the files that can hold it
                found = next((r for r in parse_lines(data)[0] if r["request_id"] == request_id), None)
                if found is not None:
                    return found
        return None

    def by_model(self, model: str, since: str, until: str) -> list[dict[str, Any]]:
        days = [d for d in self._dir.glob("date=*") if since[:10] <= d.name[5:] <= until[:10]]
        files = [f for day in days for f in (day / f"model={model}").glob("*.jsonl")]
        found = [summary(r) for r in self._records(files) if since <= r["timestamp"] < until]
        return sorted(found, key=lambda s: (s["timestamp"], s["request_id"]))

    @staticmethod
    def _records(files: Iterable[Path]) -> Iterator[Record]:
        for path in files:
            yield from parse_lines(path.read_bytes())[0]


def _write_whole(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(path)
