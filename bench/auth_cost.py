"""What authentication costs on the hot path: the same requests through an open and a secured stack.

    .venv/bin/python -m bench.auth_cost [--seconds 10]

Needs `wrk`. Two stacks from the demo registry, one open, one with consumers (API
key + JWT + a rate limit high enough never to trigger). Each row alternates between
them in one run so both see the same machine. `/nope` is answered by Envoy alone
(404), isolating the auth filters' own cost; the model path is the full hot path.
Not a test: prints a table, asserts nothing about time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

from extproc.registry import hash_api_key
from tests.conftest import Stack, demo_registry_doc, run_stack
from tests.credentials import Signer

KEY = "bench-" + "k" * 37  # a 43-character key, as `hash-key --generate` makes
ISSUER, AUDIENCE = "https://idp.bench", "model-broker"
MODEL = "/v1/models/credit-risk/predict"
BODY = '{"customer_id": "c-42", "amount": 1200}'


def secured(doc: dict[str, object], jwks: Path) -> dict[str, object]:
    doc["consumers"] = [
        {
            "name": "bench",
            "api_keys": [hash_api_key(KEY)],
            "models": ["*"],
            "rate_limit": {"requests": 1_000_000_000, "unit": "second"},
        },
        {"name": "svc", "jwt": {"issuer": ISSUER, "audiences": [AUDIENCE], "jwks_file": str(jwks)}, "models": ["*"]},
    ]
    return doc


def group_cpu_seconds(pgid: int) -> float:
    """CPU time (user + system) of every process in a process group, from /proc."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # pgrp
                total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def wrk(url: str, headers: dict[str, str], body: str | None, seconds: int, workdir: Path) -> tuple[float, int, str]:
    """(requests/s, requests, p99) from one wrk run."""
    script = workdir / "wrk.lua"
    lines = [f"wrk.method = {json.dumps('POST' if body else 'GET')}"]
    if body:
        lines.append(f"wrk.body = {json.dumps(body)}")
    lines += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
    script.write_text("\n".join(lines) + "\n")
    out = subprocess.run(
        ["wrk", "-t1", "-c16", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 30,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    count = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non_2xx and "nope" not in url:
        raise RuntimeError(f"{url}: {non_2xx.group(1)} failed responses\n{out}")
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.MULTILINE).group(1)  # type: ignore[union-attr]
    return rps, count, p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is shown")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="auth-cost-") as tmp, contextlib.ExitStack() as stacks:
        work = Path(tmp)
        signer = Signer.new("bench")
        (work / "jwks.json").write_text(json.dumps(signer.jwks()))
        token = signer.token(ISSUER, AUDIENCE, ttl_s=3600)
        open_stack: Stack = stacks.enter_context(run_stack(demo_registry_doc(), work / "open"))
        locked: Stack = stacks.enter_context(run_stack(secured(demo_registry_doc(), work / "jwks.json"), work / "sec"))
        json_ct = {"content-type": "application/json"}
        bearer = {"authorization": f"Bearer {token}"}
        rows = [
            ("404 by Envoy alone", "open", open_stack.base + "/nope", {}, None),
            ("404 by Envoy alone", "API key", locked.base + "/nope", {"x-api-key": KEY}, None),
            ("404 by Envoy alone", "JWT", locked.base + "/nope", bearer, None),
            ("model (full hot path)", "open", open_stack.base + MODEL, json_ct, BODY),
            ("model (full hot path)", "API key", locked.base + MODEL, {**json_ct, "x-api-key": KEY}, BODY),
            (
                "model (full hot path)",
                "JWT",
                locked.base + MODEL,
                {**json_ct, "authorization": f"Bearer {token}"},
                BODY,
            ),
        ]
        # Interleaved rounds: a neighbour's load burst hits every row, not one. CPU per
        # request (Envoy's and the broker's, from /proc) is far steadier than req/s on a
        # shared machine, and it is what authentication adds.
        results: list[list[tuple[float, float, float, str]]] = [[] for _ in rows]
        for _ in range(args.rounds):
            for i, (_, _, url, headers, body) in enumerate(rows):
                stack = open_stack if url.startswith(open_stack.base) else locked
                envoy, broker = (stack.procs[name].popen.pid for name in ("envoy", "broker"))  # type: ignore[union-attr]
                before = group_cpu_seconds(envoy), group_cpu_seconds(broker)
                rps, count, p99 = wrk(url, headers, body, args.seconds, work)
                envoy_us = (group_cpu_seconds(envoy) - before[0]) / count * 1e6
                broker_us = (group_cpu_seconds(broker) - before[1]) / count * 1e6
                results[i].append((envoy_us, broker_us, rps, p99))
        print(f"wrk -t1 -c16, {args.rounds} interleaved rounds of {args.seconds}s; medians")
        print("| request | credential | Envoy CPU µs/req | broker CPU µs/req | req/s | p99 |")
        print("| --- | --- | --- | --- | --- | --- |")
        for (what, credential, *_), runs in zip(rows, results, strict=True):
            envoy_us, broker_us, rps, p99 = (sorted(column)[len(runs) // 2] for column in zip(*runs, strict=True))
            print(f"| {what} | {credential} | {envoy_us:.0f} | {broker_us:.0f} | {rps:,.0f} | {p99} |")


if __name__ == "__main__":
    main()
