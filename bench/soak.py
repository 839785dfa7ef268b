"""A bounded soak: one broker stack (Envoy, broker workers, Redis, the model) under steady load for
N requests, the resident memory of every process sampled every few seconds.

`python -m bench.soak --requests 1000000` (or `make soak`). Not a test and never asserted on:
it writes a table (first sample after warm-up, peak, last, last minus first) so a process that creeps shows.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import stacks
from bench.procs import process_tree
from bench.wrk import WrkResult, run_wrk, write_script

DEFAULT_OUTPUT = Path(__file__).parent / "results" / "soak.md"


@dataclass
class Series:
    """One process's resident memory over the soak, in KiB."""

    role: str
    pid: int
    command: str
    samples: list[tuple[float, int]] = field(default_factory=list)


def rss_kib(pid: int) -> int | None:
    """VmRSS from /proc, or None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def command(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in argv if a]
    name = Path(words[0]).name if words else "?"
    # Spawned broker processes all read "python -c from multiprocessing.spawn ..."; the rest name themselves.
    return f"{name} {' '.join(words[1:4])}"[:60]


class Sampler:
    """Every `interval_s`, the RSS of every process under each role's roots (restarted workers included)."""

    def __init__(self, roots: Mapping[str, tuple[int, ...]], interval_s: float) -> None:
        self.roots, self.interval_s = roots, interval_s
        self.series: dict[int, Series] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = time.monotonic()

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        now = time.monotonic() - self._started
        for role, roots in self.roots.items():
            for pid in (p for root in roots for p in process_tree(root)):
                rss = rss_kib(pid)
                if rss is None:
                    continue
                series = self.series.setdefault(pid, Series(role, pid, command(pid)))
                series.samples.append((now, rss))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()


@dataclass
class Totals:
    requests: int = 0
    non_2xx: int = 0
    socket_errors: int = 0

    def add(self, result: WrkResult) -> None:
        self.requests += result.requests
        self.non_2xx += result.non_2xx
        self.socket_errors += result.socket_errors


def render(series: Sequence[Series], totals: Totals, elapsed_s: float, load: str) -> str:
    lines = [
        "## Soak",
        "",
        f"{totals.requests:,} requests in {elapsed_s:.0f} s ({totals.requests / elapsed_s:,.0f} req/s), "
        f"non-2xx {totals.non_2xx}, socket errors {totals.socket_errors}; {os.cpu_count()} cores shared with "
        f"other jobs (load average at the end: {load}). "
        "RSS sampled every few seconds; *first* is the first sample after the warm-up.",
        "",
        "| role | pid | process | first MiB | peak MiB | last MiB | growth MiB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in sorted(series, key=lambda s: (s.role, s.pid)):
        if not s.samples:
            continue
        first, last = s.samples[0][1] / 1024, s.samples[-1][1] / 1024
        peak = max(r for _, r in s.samples) / 1024
        lines.append(
            f"| {s.role} | {s.pid} | `{s.command}` | {first:.1f} | {peak:.1f} | {last:.1f} | {last - first:+.1f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1_000_000, help="stop once this many were answered")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk", type=float, default=30.0, help="seconds per wrk run (RSS sampled throughout)")
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--broker-workers", type=int, default=2)
    parser.add_argument("--envoy-concurrency", type=int, default=2)
    parser.add_argument("--max-minutes", type=float, default=30.0, help="stop here even short of --requests")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with stacks.session(
        "soak", broker_workers=args.broker_workers, gateway_workers=1, envoy_concurrency=args.envoy_concurrency
    ) as (stack, shared):
        workdir = shared.workdir
        target = stack.enter_context(stacks.broker(shared, "broker", "broker", cache_ttl_s=5))
        stacks.preflight(target)
        script = write_script(workdir / "post.lua", target.path)
        run_wrk(target.url, script, connections=args.connections, threads=args.threads, duration_s=args.warmup)
        totals = Totals()
        started = time.monotonic()
        deadline = started + args.max_minutes * 60
        with Sampler(target.cpu_roots, args.sample) as sampler:
            sampler.sample()
            while totals.requests < args.requests and time.monotonic() < deadline:
                result = run_wrk(
                    target.url, script, connections=args.connections, threads=args.threads, duration_s=args.chunk
                )
                totals.add(result)
                print(f"  {totals.requests:,} requests, {result.rps:,.0f} req/s", file=sys.stderr, flush=True)
            sampler.sample()
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        table = render(list(sampler.series.values()), totals, time.monotonic() - started, load)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table, encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("soak: interrupted; every process it started has been stopped")
