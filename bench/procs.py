"""Child processes for the bench: started in their own process group, always stopped, CPU read from /proc.

Broker workers, uvicorn workers and Envoy threads all live under one leader;
killing the whole group on exit is what keeps a crashed run from leaving load behind.
"""

from __future__ import annotations

import contextlib
import os
import resource
import select
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any

from extproc.process.launcher import running

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# /proc/<pid>/stat fields after the ")" that closes the command name (0-based): ppid, utime, stime.
PPID_FIELD, UTIME_FIELD, STIME_FIELD = 1, 11, 12


@contextlib.contextmanager
def process_group(cmd: Sequence[str], log: Path, **kwargs: Any) -> Iterator[subprocess.Popen[bytes]]:
    """`cmd` as the leader of a new process group, output to `log`; the whole group is gone on exit.

    The leader gets SIGTERM first (the broker supervisor and uvicorn drain their
    own workers), then anything left in the group gets SIGKILL.
    """
    group: int | None = None
    with log.open("ab") as out:
        kwargs.setdefault("stdout", out)
        try:
            with running(list(cmd), stderr=out, start_new_session=True, **kwargs) as proc:
                group = proc.pid
                yield proc
        finally:
            if group is not None:
                _kill_group(group)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def wait_for_line(stream: IO[bytes], expected: bytes, timeout_s: float) -> None:
    """Block until the child prints `expected` on its own line (its readiness signal)."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([stream], [], [], left)
        if not ready:
            break
        line = stream.readline()
        if not line:
            raise RuntimeError("process exited before it was ready")
        if line.strip() == expected:
            return
    raise RuntimeError(f"not ready after {timeout_s:.0f}s")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    # The command name may contain spaces and parentheses; the last ")" ends it.
    return raw[raw.rindex(")") + 2 :].split()


def process_tree(root: int) -> tuple[int, ...]:
    """`root` and all its descendants (the broker supervisor's spawned workers, uvicorn's workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None:
            children.setdefault(int(fields[PPID_FIELD]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tuple(sorted(tree))


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU of the processes (all their threads: Envoy's workers included) so far."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += int(fields[UTIME_FIELD]) + int(fields[STIME_FIELD])
    return ticks / CLOCK_TICKS


def system_busy_seconds() -> float:
    """CPU time all cores spent not idle, from /proc/stat: the whole box, ours and everyone else's."""
    fields = Path("/proc/stat").read_text(encoding="ascii").splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def children_cpu_seconds() -> float:
    """CPU of this process's waited-for children (wrk, once it has exited)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so every child process group is stopped."""

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
