"""`python -m bench.rules_stack`: one broker worker's CPU per derived feature and per rule, transport included.

`bench.rules_cost` prices expressions in the processor alone; `bench.run`'s broker-rules row
prices them through Envoy on a box whose load swamps a 30 µs difference. This sits between:
one real worker process (the `http_service` transport, the processor, the TTL cache over the
demo features, Prometheus in multiprocess mode, as `model-broker` runs it) loaded by `wrk`
with the ext_proc messages Envoy sends, and its CPU read from /proc. One registry holds each
model twice, plain and with 3 derived features and 3 rules, JSON and Open Inference Protocol;
for each, bodies for which no rule holds (all six expressions evaluated) and for which the
last rule holds (six evaluated, and the answer pins a version). Interleaved rounds, medians.
Not a test; on a busy box the figures include contention.

    .venv/bin/python -m bench.rules_stack [--seconds 3] [--rounds 3] [--connections 8]
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.procs import cpu_seconds

FEATURES = ["income", "debt_ratio", "tenure_months", "late_payments_12m"]
JSON_DERIVED = [
    {"name": "debt_score", "expr": "features.debt_ratio * features.tenure_months"},
    {"name": "amount_over_income", "expr": "body.amount / features.income"},
    {"name": "risky", "expr": "features.late_payments_12m > 2.0 && features.debt_ratio > 0.5", "type": "bool"},
]
JSON_RULES = [
    {"name": "germany", "when": "has(body.country) && body.country == 'DE'", "version": "v2"},
    {"name": "late", "when": "features.late_payments_12m >= 5.0 && features.debt_ratio > 0.95", "version": "v2"},
    {"name": "large", "when": "body.amount > 2500.0", "version": "v2"},
]
# The same expressions over an OIP body; derived values are columns of the FP32 tensor (numbers only).
OIP_DERIVED = [
    JSON_DERIVED[0],
    {"name": "amount_over_income", "expr": "body.parameters.amount / features.income"},
    {"name": "late_rate", "expr": "features.late_payments_12m / (features.tenure_months + 1.0)"},
]
OIP_RULES = [
    {"name": "germany", "when": "has(body.parameters.country) && body.parameters.country == 'DE'", "version": "v2"},
    JSON_RULES[1],
    {"name": "large", "when": "body.parameters.amount > 2500.0", "version": "v2"},
]


def _service(port: int, path: str) -> dict[str, Any]:
    return {"service": {"host": "127.0.0.1", "port": port, "path": path}}


def registry_doc() -> dict[str, Any]:
    from extproc.process.launcher import demo_registry_doc

    doc = demo_registry_doc(8080)
    doc["ensembles"], doc["audit"] = [], None
    plain = doc["models"][0]
    plain.update(features=FEATURES)
    plain["versions"] = [{"name": "v1", "weight": 1, "backend": _service(9, "/predict")}]
    two = [*plain["versions"], {"name": "v2", "weight": 0, "backend": _service(9, "/predict")}]
    ruled = {**copy.deepcopy(plain), "name": "json-rules", "path": "/v1/models/json-rules/predict", "versions": two}
    ruled.update(derived=JSON_DERIVED, rules=JSON_RULES)
    oip: dict[str, Any] = {
        "name": "oip",
        "protocol": "open_inference",
        "entity": "customer",
        "features": FEATURES,
        "open_inference": {"feature_tensor": {"name": "features", "datatype": "FP32"}},
        "versions": [{"name": "v1", "weight": 1, "backend": _service(9, "/v2/models/m/infer")}],
    }
    oip_two = [*oip["versions"], {"name": "v2", "weight": 0, "backend": _service(9, "/v2/models/m/infer")}]
    oip_ruled = {**copy.deepcopy(oip), "name": "oip-rules", "versions": oip_two, "derived": OIP_DERIVED}
    oip_ruled["rules"] = OIP_RULES
    doc["models"] = [plain, ruled, oip, oip_ruled]
    return doc


def _json_body(amount: int) -> bytes:
    return json.dumps({"customer_id": "c-1", "amount": amount}).encode()


def _oip_body(amount: int, rows: int = 1) -> bytes:
    keys = [f"c-{i + 1}" for i in range(rows)]
    key = {"name": "customer_id", "shape": [rows, 1], "datatype": "BYTES", "data": keys}
    return json.dumps({"inputs": [key], "parameters": {"amount": amount}}).encode()


# (name, route, body, expressions evaluated per request, the plain variant it is compared with)
VARIANTS: list[tuple[str, str, bytes, int, str]] = [
    ("JSON plain", "credit-risk", _json_body(1200), 0, ""),
    ("JSON 3 derived + 3 rules, none holds", "json-rules", _json_body(1200), 6, "JSON plain"),
    ("JSON 3 derived + 3 rules, pinned", "json-rules", _json_body(3000), 6, "JSON plain"),
    ("OIP plain", "oip", _oip_body(1200), 0, ""),
    ("OIP 3 derived + 3 rules, none holds", "oip-rules", _oip_body(1200), 6, "OIP plain"),
    ("OIP 3 derived + 3 rules, pinned", "oip-rules", _oip_body(3000), 6, "OIP plain"),
    ("OIP plain, 16 rows", "oip", _oip_body(1200, 16), 0, ""),
    ("OIP 3 derived + 3 rules, 16 rows", "oip-rules", _oip_body(1200, 16), 6 * 16, "OIP plain, 16 rows"),
]


def _serve(port: int, doc: dict[str, Any]) -> None:
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="bench-metrics-"))
    import asyncio

    import uvloop

    from extproc.adapters.egress import EgressClient
    from extproc.core.features import CachedFeatureStore, EmbeddedFeatureStore
    from extproc.core.processor import BrokerProcessor
    from extproc.registry import parse_registry
    from extproc.transport import HttpService

    async def main() -> None:
        registry = parse_registry(doc)
        store_conf = registry.feature_store.embedded
        assert store_conf is not None
        store = CachedFeatureStore(
            EmbeddedFeatureStore.from_file(store_conf.path), ttl_seconds=3600, max_entries=10_000, timeout_s=1
        )
        # OIP models need an egress client for their GET routes; none is sent here.
        processor = BrokerProcessor(registry, store, egress=EgressClient("http://127.0.0.1:9"))
        http = HttpService(processor, path="/ext_proc", max_bytes=1 << 20)
        await http.listen_tcp("127.0.0.1", port)
        await asyncio.Event().wait()

    uvloop.run(main())


def _wrk_script(path: Path, route: str, body: bytes, oip: bool) -> None:
    attributes = {"xds.route_name": route, "request.id": "bench-1"}
    if not oip:
        attributes["request.headers['content-type']"] = "application/json"
    message = {
        "request_body": {"body": base64.b64encode(body).decode(), "end_of_stream": True},
        "metadata_context": {},
        "attributes": {"envoy.filters.http.ext_proc": attributes},
        "protocol_config": {"request_body_mode": "BUFFERED"},
    }
    text = json.dumps(message).replace("\\", "\\\\").replace("'", "\\'")
    path.write_text(
        f"wrk.method = 'POST'\nwrk.body = '{text}'\nwrk.headers['Content-Type'] = 'application/json'\n",
        encoding="utf-8",
    )


def _run(pid: int, url: str, script: Path, seconds: float, connections: int) -> tuple[float, float]:
    """(requests per second, worker CPU µs per request)."""
    before = cpu_seconds((pid,))
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cpu = cpu_seconds((pid,)) - before
    requests = int(next(line for line in out.splitlines() if "requests in" in line).split()[0])
    if "Non-2xx" in out:
        raise RuntimeError(f"the worker refused requests:\n{out}")
    return requests / seconds, cpu * 1e6 / requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rules_stack", description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args(argv)
    from extproc.process.launcher import free_port, wait_listening

    port = free_port()
    worker = multiprocessing.get_context("spawn").Process(target=_serve, args=(port, registry_doc()), daemon=True)
    worker.start()
    assert worker.pid is not None
    wait_listening(port)
    url = f"http://127.0.0.1:{port}/ext_proc"
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name, *_ in VARIANTS}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            scripts: dict[str, Path] = {}
            for name, route, body, _, _ in VARIANTS:
                scripts[name] = Path(tmp) / f"{len(scripts)}.lua"
                _wrk_script(scripts[name], route, body, oip=route.startswith("oip"))
                _run(worker.pid, url, scripts[name], 1, args.connections)  # warm-up (cache, code paths)
            for _ in range(args.rounds):
                for name, taken in samples.items():
                    taken.append(_run(worker.pid, url, scripts[name], args.seconds, args.connections))
    finally:
        worker.terminate()
        worker.join()
    load = os.getloadavg()[0]
    print(
        f"one worker (http_service), {args.connections} concurrent, {args.rounds} x {args.seconds:g} s; load {load:.1f}"
    )
    print("| variant | req/s | worker CPU µs/req | over plain | per expression |\n| --- | --: | --: | --: | --: |")
    cpu = {name: statistics.median(c for _, c in values) for name, values in samples.items()}
    for name, _, _, count, plain in VARIANTS:
        rate = statistics.median(r for r, _ in samples[name])
        extra = cpu[name] - cpu[plain] if plain else 0.0
        over = f"{extra:+.1f}" if plain else "—"
        per = f"{extra / count:.1f}" if count else "—"
        print(f"| {name} | {rate:,.0f} | {cpu[name]:.1f} | {over} | {per} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
