"""`python -m bench.run`: start every configuration on loopback, load them in turn with wrk, print the table.

Interleaved runs (a, b, c, d, a, b, c, d …) and medians over rounds, so a noisy
moment on a shared box lands on one sample of each configuration, not on one
configuration. Not a test: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

from bench import configs, feast, report, stacks
from bench.fixed_rate import FixedRateResult, fixed_rate
from bench.procs import children_cpu_seconds, cpu_seconds, process_tree, system_busy_seconds
from bench.report import Sample
from bench.stacks import Shared, Target
from bench.wrk import run_wrk, write_script

RESULTS_DIR = Path(__file__).resolve().parent / "results"
AUDIT_NOTE = (
    " Audited runs last until their spool is empty: their CPU includes shipping the run's records"
    " (boto3 in the broker, and moto)."
)
PAUSE_BETWEEN_RUNS_S = 0.5

Starter = Callable[[Shared], AbstractContextManager[Target]]

# Every configuration the bench knows, in the order they are interleaved.
CONFIGS: dict[str, Starter] = {
    "envoy": stacks.plain_envoy,
    # The default transport, ext_proc http_service (the pinned Envoy honours it: probed), over Unix
    # sockets as `up` runs it on one host; then over TCP (Envoy and broker in separate pods).
    "broker": lambda s: stacks.broker(s, "broker", "(b) Envoy + broker, http_service, UDS", cache_ttl_s=5),
    "broker-tcp": lambda s: stacks.broker(
        s, "broker-tcp", "(bt) Envoy + broker, http_service, TCP", cache_ttl_s=5, unix=False
    ),
    # Without the retry hop (`broker.retry_unanswered: false`): Envoy posts straight to the workers;
    # the hop's price, paid for zero errors when a worker is killed (issue 20).
    "broker-direct": lambda s: stacks.broker(
        s,
        "broker-direct",
        "(bd) Envoy + broker, http_service, UDS, no retry hop",
        cache_ttl_s=5,
        extend=configs.without_retry_hop,
    ),
    # The same over gRPC (transport: grpc), as before issue 15 and as multi-phase routes run.
    "broker-grpc": lambda s: stacks.broker(
        s, "broker-grpc", "(bg) Envoy + broker, gRPC, UDS", cache_ttl_s=5, transport="grpc"
    ),
    "broker-grpc-tcp": lambda s: stacks.broker(
        s, "broker-grpc-tcp", "(bgt) Envoy + broker, gRPC, TCP", cache_ttl_s=5, transport="grpc", unix=False
    ),
    # Same work as the gateways, which do not cache: every request is an HMGET.
    "broker-nocache": lambda s: stacks.broker(s, "broker-nocache", "(b0) Envoy + broker, cache TTL 0", cache_ttl_s=0),
    # The price of asking for the header phase too (two ext_proc messages per request).
    "broker-headers": lambda s: stacks.broker(
        s,
        "broker-headers",
        "(b2) Envoy + broker, header + body phases (gRPC)",
        cache_ttl_s=5,
        header_phase=True,
        transport="grpc",
    ),
    # (b) with 3 derived features and 3 rules (issue 19): about half the requests pinned by a rule.
    "broker-rules": lambda s: stacks.broker(
        s, "broker-rules", "(br) Envoy + broker, 3 derived + 3 rules", cache_ttl_s=5, extend=configs.add_rules
    ),
    "aiohttp": stacks.aiohttp_gateway,
    "fastapi": stacks.fastapi_gateway,
    # (b) with every execution audited (issue 4): to S3 + DynamoDB on moto, or to local JSONL files.
    "broker-audit-moto": lambda s: stacks.broker_audit(s, "broker-audit-moto", "(b) + audit to moto", sink="moto"),
    "broker-audit-jsonl": lambda s: stacks.broker_audit(
        s, "broker-audit-jsonl", "(b) + audit to JSONL files", sink="jsonl"
    ),
    # The same on gRPC, as audited routes ran until they took http_service too (issue 16).
    "broker-audit-grpc": lambda s: stacks.broker_audit(
        s, "broker-audit-grpc", "(bg) + audit to JSONL files (gRPC)", sink="jsonl", transport="grpc"
    ),
    # One request, several copies of the model called concurrently through Envoy (issue 5).
    "ensemble-3": lambda s: stacks.ensemble(s, "ensemble-3", "(e3) ensemble of 3", members=3),
    "ensemble-1": lambda s: stacks.ensemble(s, "ensemble-1", "(e1) ensemble of 1", members=1),
    # Issue 13: the same features in a Feast repo, read natively by the broker, and by `feast serve`.
    "broker-feast": lambda s: feast.broker_feast(s, "broker-feast", "(f) Envoy + broker, Feast's Redis", cache_ttl_s=5),
    "broker-feast-nocache": lambda s: feast.broker_feast(
        s, "broker-feast-nocache", "(f0) Envoy + broker, Feast's Redis, cache TTL 0", cache_ttl_s=0
    ),
    "feast-serve": lambda s: feast.feast_serve(s, "feast-serve", "(g) feast serve, defaults", workers=1),
    "feast-serve-2": lambda s: feast.feast_serve(s, "feast-serve-2", "(g2) feast serve --workers 2", workers=2),
}
# Opt-in (--configs): they explain the default comparisons but would push the default run past ~8 min.
OPT_IN = (
    "broker-tcp",
    "broker-grpc-tcp",
    "broker-audit-jsonl",
    "broker-audit-grpc",
    "ensemble-1",
    "broker-rules",
    "broker-feast",
    "broker-feast-nocache",
    "feast-serve",
    "feast-serve-2",
)
DEFAULT_CONFIGS = tuple(name for name in CONFIGS if name not in OPT_IN)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run (default 8)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load per config first")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the median is reported")
    parser.add_argument("--connections", default="16,64", help="comma-separated wrk concurrencies (e.g. 16,64,256)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument(
        "--configs",
        "--only",
        default=",".join(DEFAULT_CONFIGS),
        help=f"which to run, in this order (default: all but {', '.join(OPT_IN)}); any of {','.join(CONFIGS)}",
    )
    parser.add_argument(
        "--fixed-rate",
        type=float,
        default=200.0,
        help="then each configuration at this many req/s, open loop: the latency it adds (0: skip)",
    )
    parser.add_argument("--fixed-duration", type=float, default=10.0, help="seconds per fixed-rate run")
    parser.add_argument("--broker-workers", type=int, default=2, help="ext_proc worker processes")
    parser.add_argument("--gateway-workers", type=int, default=2, help="worker processes per Python gateway")
    parser.add_argument("--envoy-concurrency", type=int, default=2, help="Envoy worker threads, both Envoys")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "latest.md", help="where the table is written")
    args = parser.parse_args(argv)
    args.connections = [int(c) for c in args.connections.split(",")]
    args.configs = [c.strip() for c in args.configs.split(",")]
    unknown = set(args.configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs: {', '.join(sorted(unknown))}")
    if not 1 <= args.duration <= 120 or not 1 <= args.rounds <= 10 or not 0 <= args.warmup <= 30:
        parser.error("keep runs bounded: --duration 1..120, --rounds 1..10, --warmup 0..30")
    warn_missing_baselines(args.configs)
    return args


def warn_missing_baselines(selected: Sequence[str]) -> None:
    """A comparison row needs its baseline in the same run (same box, same moment)."""
    for variant, baseline, what in report.COMPARISONS:
        if variant in selected and baseline not in selected:
            print(f"bench: no '{what}' row without {baseline} in --configs", file=sys.stderr)


def require_tools() -> None:
    missing = [tool for tool in ("wrk", "redis-server") if shutil.which(tool) is None]
    if missing:
        sys.exit(f"missing {' and '.join(missing)}: run `scripts/ensure-system-packages wrk redis-server`")


def measure(target: Target, script: Path, connections: int, round_no: int, args: argparse.Namespace) -> Sample:
    """One wrk run with the CPU of every process charged to the target read before and after.

    An audited target's window lasts until its spool is empty, so the CPU of
    shipping the run's records (broker and moto) is charged to the run and
    none is left to load the next one. Whatever the box burned beyond those
    processes and wrk is "foreign" load (other jobs on a shared machine):
    reported, so a noisy sample can be seen as such.
    """
    pids = {role: tuple(p for root in roots for p in process_tree(root)) for role, roots in target.cpu_roots.items()}
    before = {role: cpu_seconds(p) for role, p in pids.items()}
    busy_before, wrk_before, started = system_busy_seconds(), children_cpu_seconds(), time.monotonic()
    result = run_wrk(target.url, script, connections=connections, threads=args.threads, duration_s=args.duration)
    settle_s = target.audit.settle() if target.audit is not None else None
    elapsed = time.monotonic() - started
    spent = {role: cpu_seconds(p) - before[role] for role, p in pids.items()}
    ours = sum(spent.values()) + children_cpu_seconds() - wrk_before
    foreign_cores = max(0.0, system_busy_seconds() - busy_before - ours) / elapsed
    cpu_us = {role: seconds * 1e6 / max(result.requests, 1) for role, seconds in spent.items()}
    return Sample(target.name, target.label, connections, round_no, result, cpu_us, foreign_cores, settle_s)


def write_scripts(targets: Sequence[Target], workdir: Path) -> dict[str, Path]:
    """One wrk script per request path (models and ensembles have their own), by target name."""
    by_path = {path: write_script(workdir / f"post-{i}.lua", path) for i, path in enumerate({t.path for t in targets})}
    return {target.name: by_path[target.path] for target in targets}


def warm_up(targets: Sequence[Target], scripts: Mapping[str, Path], args: argparse.Namespace) -> None:
    """Fill connection pools, caches and lazy imports before anything is measured (and ship what that audited)."""
    if args.warmup <= 0:
        return
    for target in targets:
        run_wrk(
            target.url,
            scripts[target.name],
            connections=max(args.connections),
            threads=args.threads,
            duration_s=args.warmup,
        )
        if target.audit is not None:
            target.audit.settle()


def load_all(targets: Sequence[Target], scripts: Mapping[str, Path], args: argparse.Namespace) -> list[Sample]:
    samples = []
    for round_no in range(1, args.rounds + 1):
        for connections in args.connections:
            for target in targets:
                time.sleep(PAUSE_BETWEEN_RUNS_S)
                sample = measure(target, scripts[target.name], connections, round_no, args)
                samples.append(sample)
                print(_progress(sample, args.rounds), file=sys.stderr, flush=True)
    return samples


def fixed_rate_all(targets: Sequence[Target], args: argparse.Namespace) -> list[tuple[Target, FixedRateResult]]:
    """Every configuration at the same fixed rate, one after the other (see `bench.fixed_rate`)."""
    if args.fixed_rate <= 0:
        return []
    results = []
    # `feast serve` answers a lookup body, not the model request this phase sends.
    for target in (t for t in targets if not t.feast_serve):
        time.sleep(PAUSE_BETWEEN_RUNS_S)
        result = fixed_rate(target.url, args.fixed_rate, args.fixed_duration)
        print(
            f"  fixed {result.rate:.0f} req/s {target.name:<18} p50 {result.p50_ms:6.2f} ms"
            f"  p99 {result.p99_ms:6.2f} ms  failures {result.failures} {result.failure_kinds or ''}",
            file=sys.stderr,
            flush=True,
        )
        results.append((target, result))
    return results


def _progress(sample: Sample, rounds: int) -> str:
    cpu = ", ".join(f"{role} {us:.0f}" for role, us in sample.cpu_us.items())
    errors = f", non-2xx {sample.wrk.non_2xx}" if sample.wrk.non_2xx or sample.wrk.socket_errors else ""
    shipped = "" if sample.settle_s is None else f"; spool empty after {sample.settle_s:.1f} s"
    return (
        f"  round {sample.round}/{rounds} c={sample.connections:<3} {sample.config:<18} "
        f"{sample.wrk.rps:8,.0f} req/s  p50 {sample.wrk.p50_ms:6.2f} ms  p99 {sample.wrk.p99_ms:6.2f} ms"
        f"{errors}  (CPU µs/req: {cpu}; foreign load {sample.foreign_cores:.2f} cores{shipped})"
    )


def header(args: argparse.Namespace, elapsed_s: float) -> list[str]:
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False).stdout
    return [
        f"## Model Broker bench, {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        "",
        f"{os.cpu_count()} cores, everything on loopback; {wrk_version.split(' [')[0].strip() or 'wrk'}, "
        f"{args.threads} threads, {args.duration:g} s per run, rounds: {args.rounds} (interleaved), medians shown "
        f"(non-2xx and socket errors summed over rounds). Broker: {args.broker_workers} workers; gateways: "
        f"{args.gateway_workers} workers; Envoy: {args.envoy_concurrency} worker threads. "
        f"Requests vary over 1000 customers; features from one local redis-server. Run took {elapsed_s:.0f} s.",
        "CPU µs/req: user + system time of that tier's processes over the run, divided by requests."
        + (AUDIT_NOTE if any(c.startswith("broker-audit") for c in args.configs) else ""),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    require_tools()
    started = time.monotonic()
    budget = len(args.configs) * (args.warmup + args.rounds * len(args.connections) * (args.duration + 0.6))
    shipping = " plus the wait for audit shipping" if any(c.startswith("broker-audit") for c in args.configs) else ""
    print(f"bench: {', '.join(args.configs)}; about {budget / 60:.1f} min of load{shipping}", file=sys.stderr)
    with stacks.session(
        "bench",
        broker_workers=args.broker_workers,
        gateway_workers=args.gateway_workers,
        envoy_concurrency=args.envoy_concurrency,
    ) as (stack, shared):
        workdir = shared.workdir
        targets = [stack.enter_context(CONFIGS[name](shared)) for name in args.configs]
        for target in targets:
            stacks.preflight(target)
        scripts = write_scripts(targets, workdir)
        warm_up(targets, scripts, args)
        samples = load_all(targets, scripts, args)
        steady = fixed_rate_all(targets, args)
    table = report.render(report.summarize(samples), header(args, time.monotonic() - started))
    table += report.render_fixed_rate(steady, baseline="envoy")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table, encoding="utf-8")
    raw = args.output.with_suffix(".json")
    raw.write_text(json.dumps([s.to_dict() for s in samples], indent=1), encoding="utf-8")
    print(table)
    print(f"written to {args.output} (raw samples: {raw.name})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("bench: interrupted; every process it started has been stopped")
