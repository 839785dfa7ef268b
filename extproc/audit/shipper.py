"""The shipper: sealed spool segments → the audit sink, then deleted. One per worker.

Each worker ships its own spool directory: no other process ever touches a
segment, so no locks, and a worker restarted by the supervisor picks up what
its predecessor left. Sink calls are blocking (boto3, file I/O) and run in a
thread; a sink failure never reaches a request (the spool absorbs the outage)
and is retried with capped exponential backoff.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from extproc import metrics
from extproc.audit.record import AuditSink, AuditSinkUnavailable, Record
from extproc.audit.spool import Spool, parse_lines

log = logging.getLogger("model_broker.shipper")

BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 10.0


@dataclass(frozen=True, slots=True)
class ShipTiming:
    interval_s: float
    seal_after_s: float
    fsync_interval_s: float

    @property
    def tick_s(self) -> float:
        return min(self.interval_s, self.seal_after_s, self.fsync_interval_s)


def next_backoff(current: float) -> float:
    return min(BACKOFF_MAX_S, max(BACKOFF_FIRST_S, current * 2))


def read_segment(path: Path) -> tuple[list[Record], int]:
    """A sealed segment's records and its size on disk."""
    data = path.read_bytes()
    records, torn = parse_lines(data)
    if torn:
        log.warning("%s: skipped %d unreadable line(s)", path.name, torn)
    return records, len(data)


def ship_segment(sink: AuditSink, path: Path) -> tuple[int, int]:
    """Put one segment's records into the sink; blocking. Returns the segment's size and record count."""
    records, size = read_segment(path)
    if records:
        sink.put(path.stem, records)
    return size, len(records)


def half_full_message(was_above: bool, used: int, bound: int) -> tuple[bool, str | None]:
    """Whether the spool is now past half its bound, and the line to log when that just changed."""
    above = used * 2 > bound
    if above == was_above:
        return above, None
    if above:
        return above, f"audit spool past half its bound ({used} of {bound} bytes): the sink is not keeping up"
    return above, f"audit spool back under half its bound ({used} of {bound} bytes)"


class Shipper:
    def __init__(self, spool: Spool, sink: AuditSink, timing: ShipTiming) -> None:
        self.spool = spool
        self._sink = sink
        self._timing = timing
        self._backoff = 0.0
        self._retry_at = 0.0
        self._last_fsync = 0.0
        self._above_half = False
        self.shipped_segments = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop`: seal old segments, fsync the active one, ship what is sealed."""
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            await self.step(loop.time())
            try:
                async with asyncio.timeout(self._timing.tick_s):
                    await stop.wait()
            except TimeoutError:
                pass

    async def step(self, now: float) -> None:
        self.spool.rotate_if_older(self._timing.seal_after_s)
        await self.seal()
        fd = self.spool.active_fd()
        if fd is not None and now - self._last_fsync >= self._timing.fsync_interval_s:
            await asyncio.to_thread(os.fsync, fd)
            self._last_fsync = now
        if now >= self._retry_at:
            await self.ship(now)
        self.report()

    def report(self) -> None:
        """Depth and age of what waits in the spool, as metrics; a log line when it crosses half its bound."""
        oldest = self.spool.oldest()
        metrics.AUDIT_SPOOL_BYTES.set(self.spool.used)
        metrics.AUDIT_OLDEST_SECONDS.set(0.0 if oldest is None else max(0.0, time.time() - oldest))
        self._above_half, message = half_full_message(self._above_half, self.spool.used, self.spool.max_bytes)
        if message is not None:
            log.warning("%s", message)

    async def seal(self) -> None:
        rotated = self.spool.take_rotated()
        if rotated:
            await asyncio.to_thread(Spool.seal, rotated)

    async def ship(self, now: float) -> bool:
        """Ship every sealed segment, oldest first; on a sink failure back off. True when all shipped."""
        for path in list(self.spool.sealed()):
            try:
                size, count = await asyncio.to_thread(ship_segment, self._sink, path)
            except AuditSinkUnavailable as exc:
                metrics.AUDIT_SHIP_FAILURES.inc()
                self._backoff = next_backoff(self._backoff)
                self._retry_at = now + self._backoff
                log.warning("audit sink unavailable, retrying in %.1fs: %s", self._backoff, exc)
                return False
            self.spool.remove(path, size)
            metrics.AUDIT_SHIPPED.inc(count)
            self.shipped_segments += 1
            if self._backoff:
                log.info("audit sink is back; shipping resumed")
            self._backoff = 0.0
        return True

    async def drain(self, budget_s: float) -> None:
        """On shutdown: seal everything, then ship within `budget_s`; what is left ships on next start."""
        self.spool.rotate()
        await self.seal()
        try:
            async with asyncio.timeout(budget_s):
                await self.ship(asyncio.get_running_loop().time())
        except TimeoutError:
            log.warning("shutdown: unshipped segments stay in %s", self.spool.directory)
