"""Whether the spool's filesystem can take records now, asked before a model runs.

`max_bytes` bounds the spool, not the disk: other writers fill it too, and a
write that fails after the model answered is too late for "nothing runs that
cannot be audited". So the spool also needs free space above a floor and, after
a failed write, a probe write that succeeds. Both are checked at most every
`CHECK_SECONDS` (one `statvfs` per interval, not per request), and a change of
state is logged once, not once per refused request.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("model_broker.spool")

CHECK_SECONDS = 0.1
PROBE_FILE = ".write-probe"
PROBE_BYTES = 4096


class DiskCheck:
    def __init__(self, directory: Path, min_free_bytes: int, clock: Callable[[], float]) -> None:
        self.directory = directory
        self.min_free_bytes = min_free_bytes
        self._clock = clock
        self._next_check = float("-inf")
        self._writable = True
        self._failed = False

    def ok(self) -> bool:
        """True when a record can be written now (re-checked at most every CHECK_SECONDS)."""
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + CHECK_SECONDS
            problem = self._free_space_problem() or (self._probe_problem() if self._failed else "")
            self._set(problem)
        return self._writable

    def failed(self, exc: OSError) -> None:
        """A record write failed: not writable until a probe succeeds."""
        self._failed = True
        self._next_check = self._clock() + CHECK_SECONDS
        self._set(f"a write failed: {exc}")

    def _free_space_problem(self) -> str:
        try:
            stat = os.statvfs(self.directory)
        except OSError as exc:
            return f"statvfs failed: {exc}"
        free = stat.f_bavail * stat.f_frsize
        return f"{free} bytes free, below min_free_bytes {self.min_free_bytes}" if free < self.min_free_bytes else ""

    def _probe_problem(self) -> str:
        """Write, sync and remove a small file: the disk takes writes again, or why not."""
        path = self.directory / PROBE_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(bytes(PROBE_BYTES))
                while view:  # a short write is not success: the next one tells why it stopped
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            return f"the write probe failed: {exc}"
        finally:
            path.unlink(missing_ok=True)
        self._failed = False
        return ""

    def _set(self, problem: str) -> None:
        writable = not problem
        if writable != self._writable:
            if writable:
                log.warning("audit spool %s writable again", self.directory)
            else:
                log.error(
                    "audit spool %s cannot take records (%s); audited requests are refused", self.directory, problem
                )
        self._writable = writable
