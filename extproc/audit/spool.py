"""The local append-only spool: JSONL segment files in one worker's own directory.

A record is one `write(2)` to the active segment before its response is released:
in the page cache, it survives the process being killed the next instant; a
periodic fsync bounds what a power loss can take. Full segments (or old ones)
are sealed, `<name>.open` → `<name>.jsonl`, and only sealed ones are shipped.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from extproc.audit.disk import DiskCheck

log = logging.getLogger("model_broker.spool")

OPEN_SUFFIX = ".open"
SEALED_SUFFIX = ".jsonl"


@dataclass(slots=True)
class Segment:
    """A segment being written (or waiting to be sealed): its file, descriptor, size, birth."""

    path: Path
    fd: int
    size: int = 0
    opened_at: float = 0.0


def segment_name(epoch_ms: int, token: str, seq: int) -> str:
    """Names sort by creation time and never repeat across processes, restarts or hosts (`token` is random).

    The shipped object is named after its segment, so two brokers must never share a name.
    """
    return f"{epoch_ms:013d}-{token}-{seq:06d}"


def created_at(path: Path) -> float:
    """When a segment was started (its first record), in epoch seconds, read from its name."""
    return int(path.name[:13]) / 1000


def parse_lines(data: bytes) -> tuple[list[dict[str, Any]], int]:
    """Records of a segment, and how many lines were unreadable (a torn last write after power loss)."""
    records, torn = [], 0
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            records.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            torn += 1
    return records, torn


def find_spooled(root: Path, request_id: str) -> dict[str, Any] | None:
    """A record still waiting in any process's spool under `root` (`<spool.dir>/<process>/<segment>`).

    The feedback join looks here first: a truth posted right after its answer finds the
    record before the shipper has moved it to the sink.
    """
    wanted = request_id.encode()
    for path in sorted(root.glob("*/*"), reverse=True):  # newest segments first
        if path.suffix not in (OPEN_SUFFIX, SEALED_SUFFIX):
            continue
        try:
            data = path.read_bytes()
        except OSError:  # shipped and removed while we looked
            continue
        if wanted in data:
            found = next((r for r in parse_lines(data)[0] if r.get("request_id") == request_id), None)
            if found is not None:
                return found
    return None


class Spool:
    """One worker's spool: appends on the event loop, sealing and fsync in the shipper's thread.

    `used` counts every byte in the directory, sealed or not, so the bound holds
    across restarts and however far the shipper has fallen behind.
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int,
        segment_bytes: int,
        min_free_bytes: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.disk = DiskCheck(directory, min_free_bytes, clock)
        self._clock = clock
        self._seq = itertools.count()
        self._token = secrets.token_hex(4)
        self._active: Segment | None = None
        self._rotated: list[Segment] = []
        self.used = 0

    def open(self) -> None:
        """Create the directory; seal what a killed process left open, so it ships."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for leftover in sorted(self.directory.glob("*" + OPEN_SUFFIX)):
            leftover.rename(leftover.with_suffix(SEALED_SUFFIX))
        self.used = sum(p.stat().st_size for p in self.directory.iterdir() if p.is_file())

    def has_room(self, size: int = 1) -> bool:
        return self.used + size <= self.max_bytes

    def writable(self) -> bool:
        """Room under the bound and a disk that takes writes (see `DiskCheck`): asked before a model runs."""
        return self.has_room() and self.disk.ok()

    def append(self, line: bytes) -> bool:
        """Write one record line; False (nothing written) when it would pass the bound or the disk refuses.

        A write the disk refuses half-way is cut back, so a segment never holds a partial line.
        """
        if not self.has_room(len(line)):
            return False
        segment = self._active
        try:
            segment = segment or self._start()
            view = memoryview(line)
            while view:
                written = os.write(segment.fd, view)
                view = view[written:]
        except OSError as exc:
            if segment is not None:
                self._cut_back(segment)
            self.disk.failed(exc)
            return False
        segment.size += len(line)
        self.used += len(line)
        if segment.size >= self.segment_bytes:
            self.rotate()
        return True

    @staticmethod
    def _cut_back(segment: Segment) -> None:
        """Drop the partial line a failed write left (appends resume at the new end: O_APPEND)."""
        try:
            os.ftruncate(segment.fd, segment.size)
        except OSError as exc:  # the record is refused either way; the shipper skips a torn last line
            log.error("could not cut a partial record from %s: %s", segment.path, exc)

    def _start(self) -> Segment:
        name = segment_name(int(time.time() * 1000), self._token, next(self._seq))
        path = self.directory / (name + OPEN_SUFFIX)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        self._active = Segment(path, fd, opened_at=self._clock())
        return self._active

    def rotate(self) -> None:
        """Stop appending to the active segment; the next `seal_rotated` makes it shippable."""
        if self._active is not None:
            self._rotated.append(self._active)
            self._active = None

    def rotate_if_older(self, seconds: float) -> None:
        if self._active is not None and self._clock() - self._active.opened_at >= seconds:
            self.rotate()

    def take_rotated(self) -> list[Segment]:
        """Hand the rotated segments to the sealing thread (called on the loop, so no list is shared)."""
        taken, self._rotated = self._rotated, []
        return taken

    @staticmethod
    def seal(segments: list[Segment]) -> None:
        """fsync, close and rename each segment; blocking, run in a thread."""
        for segment in segments:
            os.fsync(segment.fd)
            os.close(segment.fd)
            segment.path.rename(segment.path.with_suffix(SEALED_SUFFIX))

    def close(self) -> None:
        """Seal the segment being written now (blocking): for a spool that takes no more records."""
        self.rotate()
        Spool.seal(self.take_rotated())

    def active_fd(self) -> int | None:
        return self._active.fd if self._active is not None else None

    def oldest(self) -> float | None:
        """Creation time (epoch seconds) of the oldest segment not yet shipped; None when all are."""
        segments = [*self.sealed(), *(s.path for s in self._rotated)]
        if self._active is not None:
            segments.append(self._active.path)
        return min((created_at(p) for p in segments), default=None)

    def sealed(self) -> Iterator[Path]:
        """Sealed segments, oldest first."""
        yield from sorted(self.directory.glob("*" + SEALED_SUFFIX))

    def remove(self, path: Path, size: int) -> None:
        """Delete a shipped segment and give its bytes back to the bound."""
        path.unlink(missing_ok=True)
        self.used = max(0, self.used - size)
