"""Medians per configuration and concurrency, rendered as the markdown table the README quotes.

Pure functions over `Sample`s, so the table can be re-rendered from a saved run.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from bench.wrk import WrkResult

# The goals (issue 15), printed beside the ratios they steer.
GOAL_VS_PLAIN = 0.4
GOAL_VS_AIOHTTP = 1.0
GOAL_VS_FASTAPI = 6.0
GOAL_P99_VS_PLAIN_AT_16 = 2.0
GOAL_BROKER_CPU_US = 50.0
# At a fixed rate with no process saturated: what the broker may add over plain Envoy.
GOAL_ADDED_P50_MS = 1.0
GOAL_ADDED_P99_MS = 3.0
BROKERS = (
    "broker",
    "broker-direct",
    "broker-tcp",
    "broker-grpc",
    "broker-grpc-tcp",
    "broker-nocache",
    "broker-headers",
    "broker-rules",
)
# Issue 13: the broker's enriched hop (Envoy included) against `feast serve` answering the lookup
# alone, and the Feast read against the own-layout read (broker CPU, same cache setting).
GOAL_FEAST_READ_VS_OWN = 1.10
FEAST_PAIRS = (("broker-feast", "broker"), ("broker-feast-nocache", "broker-nocache"))
FEAST_SERVERS = ("feast-serve", "feast-serve-2")
# Side by side: (variant, baseline, what the ratio prices); a row appears when both ran.
COMPARISONS = (
    ("broker-audit-moto", "broker", "audit to moto ÷ no audit"),
    ("broker-audit-jsonl", "broker", "audit to JSONL ÷ no audit"),
    ("broker-audit-grpc", "broker-grpc", "audit to JSONL ÷ no audit (gRPC)"),
    ("broker-audit-jsonl", "broker-audit-grpc", "audited: http_service ÷ gRPC (JSONL)"),
    ("broker", "broker-grpc", "http_service ÷ gRPC (UDS)"),
    ("broker", "broker-direct", "retry hop ÷ none (http_service)"),
    ("broker", "broker-tcp", "UDS ÷ TCP (http_service)"),
    ("broker-grpc", "broker-grpc-tcp", "UDS ÷ TCP (gRPC)"),
    ("ensemble-3", "broker", "ensemble of 3 ÷ single call"),
    ("ensemble-1", "broker", "ensemble of 1 ÷ single call"),
    ("ensemble-3", "ensemble-1", "ensemble of 3 ÷ ensemble of 1"),
)


@dataclass(frozen=True, slots=True)
class Sample:
    """One wrk run of one configuration at one concurrency."""

    config: str
    label: str
    connections: int
    round: int
    wrk: WrkResult
    # role → CPU µs per request over the run
    cpu_us: dict[str, float] = field(default_factory=dict)
    # Cores kept busy by processes outside the bench during the run (a shared box's noise).
    foreign_cores: float = 0.0
    # Audited configurations: seconds after wrk stopped until the run's records were all shipped.
    settle_s: float | None = None

    @property
    def shipped_rps(self) -> float | None:
        """Audited: requests over the run plus the wait for its records to ship (what the box sustains)."""
        if self.settle_s is None:
            return None
        return self.wrk.requests / (self.wrk.duration_s + self.settle_s)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"rps": self.wrk.rps, "shipped_rps": self.shipped_rps}


@dataclass(frozen=True, slots=True)
class Row:
    """The median of a configuration's rounds at one concurrency."""

    config: str
    label: str
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int
    cpu_us: dict[str, float]
    foreign_cores: float
    settle_s: float | None
    shipped_rps: float | None

    @property
    def total_cpu_us(self) -> float:
        """Every tier's CPU per request: the whole box's cost of one request in this configuration."""
        return sum(self.cpu_us.values())


def summarize(samples: Iterable[Sample]) -> list[Row]:
    """Median req/s, latency and CPU per (config, concurrency); error counts are summed, never hidden."""
    groups: dict[tuple[str, int], list[Sample]] = {}
    for sample in samples:
        groups.setdefault((sample.config, sample.connections), []).append(sample)
    rows = []
    for (config, connections), group in groups.items():
        roles = {role for s in group for role in s.cpu_us}
        rows.append(
            Row(
                config=config,
                label=group[0].label,
                connections=connections,
                rps=statistics.median(s.wrk.rps for s in group),
                p50_ms=statistics.median(s.wrk.p50_ms for s in group),
                p99_ms=statistics.median(s.wrk.p99_ms for s in group),
                non_2xx=sum(s.wrk.non_2xx for s in group),
                socket_errors=sum(s.wrk.socket_errors for s in group),
                cpu_us={r: statistics.median(s.cpu_us[r] for s in group if r in s.cpu_us) for r in sorted(roles)},
                foreign_cores=statistics.median(s.foreign_cores for s in group),
                settle_s=_median_or_none([s.settle_s for s in group]),
                shipped_rps=_median_or_none([s.shipped_rps for s in group]),
            )
        )
    return rows


def _median_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _cpu(row: Row, role: str) -> str:
    value = row.cpu_us.get(role)
    return "-" if value is None else f"{value:.0f}"


def _proxy_cpu(row: Row) -> str:
    """The Python tier's CPU: the broker's workers, the gateway's, or `feast serve`'s."""
    role = next((r for r in ("broker", "gateway", "feast") if r in row.cpu_us), "broker")
    return _cpu(row, role)


def _hop_cpu(row: Row) -> float:
    """What answering costs beyond the model and the store: Envoy + broker, or the feature server."""
    return sum(row.cpu_us.get(role, 0.0) for role in ("envoy", "broker", "gateway", "feast"))


def feast_table(rows: Sequence[Row]) -> list[str]:
    """The Feast read against the own layout and against `feast serve`; empty unless a Feast config ran."""
    by_key = {(r.config, r.connections): r for r in rows}
    lines = []
    for connections in sorted({r.connections for r in rows}):
        # A feature server whose worker was replaced mid-run lost that worker's CPU (a negative delta): not a figure.
        found = (by_key.get((n, connections)) for n in FEAST_SERVERS)
        servers = [r for r in found if r is not None and _hop_cpu(r) > 0]
        cheapest = min(servers, key=_hop_cpu) if servers else None
        for variant, baseline in FEAST_PAIRS:
            row, base = by_key.get((variant, connections)), by_key.get((baseline, connections))
            if row is None:
                continue
            vs_own = _ratio(row.cpu_us.get("broker", 0.0), base.cpu_us.get("broker") if base else None)
            vs_serve = _ratio(_hop_cpu(row), _hop_cpu(cheapest) if cheapest else None)
            lines.append(
                f"| {row.label} | {connections} | {row.rps:,.0f} | {row.p99_ms:.2f} | {_cpu(row, 'broker')} "
                f"| {_hop_cpu(row):.0f} | {vs_own} | {cheapest.label if cheapest else '-'}: "
                f"{_hop_cpu(cheapest) if cheapest else 0:.0f} | {vs_serve} |"
            )
    if not lines:
        return []
    return [
        f"| Feast read | conns | req/s | p99 ms | broker CPU µs/req | Envoy + broker CPU µs/req "
        f"| broker CPU ÷ own layout (goal ≤ {GOAL_FEAST_READ_VS_OWN:.2f}) | cheapest `feast serve` CPU µs/req "
        "| enriched hop ÷ feast serve (goal < 1) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
        *lines,
    ]


def results_table(rows: Sequence[Row]) -> list[str]:
    lines = [
        "| config | conns | req/s | p50 ms | p99 ms | non-2xx | socket errors "
        "| Envoy CPU µs/req | Python CPU µs/req | Redis CPU µs/req | model CPU µs/req | moto CPU µs/req "
        "| foreign load, cores |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in sorted(rows, key=lambda r: (r.connections, r.label)):
        lines.append(
            f"| {row.label} | {row.connections} | {row.rps:,.0f} | {row.p50_ms:.2f} | {row.p99_ms:.2f} "
            f"| {row.non_2xx} | {row.socket_errors} | {_cpu(row, 'envoy')} | {_proxy_cpu(row)} | {_cpu(row, 'redis')} "
            f"| {_cpu(row, 'model')} | {_cpu(row, 'aws')} | {row.foreign_cores:.2f} |"
        )
    return lines


def _ratio(numerator: float, denominator: float | None) -> str:
    return "-" if not denominator else f"{numerator / denominator:.2f}x"


def ratios_table(rows: Sequence[Row]) -> list[str]:
    """Each broker variant against its neighbours at the same concurrency; empty if no broker variant ran."""
    by_key = {(r.config, r.connections): r for r in rows}
    header = [
        f"| broker config | conns | req/s ÷ plain Envoy (goal ≥ {GOAL_VS_PLAIN}) "
        f"| ÷ aiohttp (goal ≥ {GOAL_VS_AIOHTTP}) | ÷ FastAPI (goal ≥ {GOAL_VS_FASTAPI:g}) "
        f"| p99 ÷ plain Envoy (goal ≤ {GOAL_P99_VS_PLAIN_AT_16:g} at 16) "
        f"| broker CPU µs/req (goal ≤ {GOAL_BROKER_CPU_US:.0f}) | Envoy CPU µs/req: plain → with broker |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    lines = []
    for connections in sorted({r.connections for r in rows}):
        plain, aio, fast = (by_key.get((c, connections)) for c in ("envoy", "aiohttp", "fastapi"))
        for name in BROKERS:
            row = by_key.get((name, connections))
            if row is None:
                continue
            envoy_cpu = f"{_cpu(plain, 'envoy') if plain else '-'} -> {_cpu(row, 'envoy')}"
            lines.append(
                f"| {row.label} | {connections} | {_ratio(row.rps, plain.rps if plain else None)} "
                f"| {_ratio(row.rps, aio.rps if aio else None)} | {_ratio(row.rps, fast.rps if fast else None)} "
                f"| {_ratio(row.p99_ms, plain.p99_ms if plain else None)} | {_cpu(row, 'broker')} | {envoy_cpu} |"
            )
    return [*header, *lines] if lines else []


def comparisons_table(rows: Sequence[Row]) -> list[str]:
    """Audit and ensembles against the plain broker (and each other) at the same concurrency; empty if none ran."""
    by_key = {(r.config, r.connections): r for r in rows}
    lines = []
    for connections in sorted({r.connections for r in rows}):
        for variant, baseline, what in COMPARISONS:
            row, base = by_key.get((variant, connections)), by_key.get((baseline, connections))
            if row is not None and base is not None:
                lines.append(_comparison(what, row, base))
    if not lines:
        return []
    return [
        "| comparison | conns | req/s: baseline -> variant | ratio | p99 ms: baseline -> variant | ratio "
        "| Python CPU µs/req | all tiers CPU µs/req | added CPU µs/req | spool empty after, s "
        "| req/s incl. shipping |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        *lines,
    ]


def _comparison(what: str, row: Row, base: Row) -> str:
    """One ratio row: baseline → variant for each number, the variant's over the baseline's."""
    settled = "-" if row.settle_s is None else f"{row.settle_s:.1f}"
    shipped = "-" if row.shipped_rps is None else f"{row.shipped_rps:,.0f}"
    return (
        f"| {what} | {row.connections} | {base.rps:,.0f} -> {row.rps:,.0f} | {_ratio(row.rps, base.rps)} "
        f"| {base.p99_ms:.2f} -> {row.p99_ms:.2f} | {_ratio(row.p99_ms, base.p99_ms)} "
        f"| {_cpu(base, 'broker')} -> {_cpu(row, 'broker')} "
        f"| {base.total_cpu_us:.0f} -> {row.total_cpu_us:.0f} | {row.total_cpu_us - base.total_cpu_us:+.0f} "
        f"| {settled} | {shipped} |"
    )


def render(rows: Sequence[Row], header: Sequence[str]) -> str:
    tables = [
        table
        for table in (results_table(rows), ratios_table(rows), comparisons_table(rows), feast_table(rows))
        if table
    ]
    return "\n".join([*header, *(line for table in tables for line in ["", *table]), ""])


class FixedRate(Protocol):
    @property
    def rate(self) -> float: ...
    @property
    def requests(self) -> int: ...
    @property
    def failures(self) -> int: ...
    @property
    def p50_ms(self) -> float: ...
    @property
    def p99_ms(self) -> float: ...
    @property
    def failure_kinds(self) -> dict[str, int]: ...


class Named(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def label(self) -> str: ...


def render_fixed_rate(results: Sequence[tuple[Named, FixedRate]], *, baseline: str) -> str:
    """Latency at one fixed rate per configuration, and what each adds over `baseline` (plain Envoy)."""
    if not results:
        return ""
    base = next((r for t, r in results if t.name == baseline), None)
    lines = [
        "",
        f"At a fixed {results[0][1].rate:.0f} req/s (open loop, timed from when each request was due): "
        f"added latency goal p50 ≤ {GOAL_ADDED_P50_MS:g} ms, p99 ≤ {GOAL_ADDED_P99_MS:g} ms over plain Envoy.",
        "",
        "| config | requests | failures | p50 ms | p99 ms | added p50 ms | added p99 ms | failures by kind |",
        "|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for target, result in results:
        added = (
            ("-", "-")
            if base is None or target.name == baseline
            else (
                f"{result.p50_ms - base.p50_ms:+.2f}",
                f"{result.p99_ms - base.p99_ms:+.2f}",
            )
        )
        lines.append(
            f"| {target.label} | {result.requests} | {result.failures} | {result.p50_ms:.2f} | {result.p99_ms:.2f} "
            f"| {added[0]} | {added[1]} | {_kinds(result.failure_kinds)} |"
        )
    return "\n".join([*lines, ""])


def _kinds(kinds: dict[str, int]) -> str:
    return ", ".join(f"{kind}: {count}" for kind, count in sorted(kinds.items())) or "-"
