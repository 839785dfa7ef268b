"""`python -m bench.rules_cost`: the broker's CPU per derived feature and per rule, in-process.

The processor's body phase (parse, entity key, features from a warm in-memory store,
inject, answer) run N times per model: the plain model, the same with 3 derived
features, with 3 rules, and with both. The differences divided by the expressions
evaluated are the cost the issue's goal (≤ 10 µs each) is about; gRPC and Envoy are
left out on purpose, they do not change with expressions (the stack-level price is in
`bench.run --only broker,broker-rules`). Interleaved rounds, medians. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import statistics
import time
from typing import Any

from extproc.core.context import RequestContext
from extproc.core.features import EmbeddedFeatureStore
from extproc.core.messages import HttpBody
from extproc.core.processor import BrokerProcessor
from extproc.process.launcher import demo_registry_doc, free_port
from extproc.registry import parse_registry

DERIVED = [
    {"name": "debt", "expr": "features.debt_ratio * features.income"},
    {"name": "amount_over_income", "expr": "body.amount / features.income"},
    {"name": "risky", "expr": "features.late_payments_12m > 2.0 && features.debt_ratio > 0.5", "type": "bool"},
]
# Three rules, and for a body like BODY none holds: all three are evaluated on every request.
RULES = [
    {"name": "germany", "when": "has(body.country) && body.country == 'DE'", "version": "v2"},
    {"name": "late", "when": "features.late_payments_12m >= 4.0 && features.debt_ratio > 0.8", "version": "v2"},
    {"name": "large", "when": "body.amount > 1000000.0", "split": {"v1": 50, "v2": 50}},
]
BODY = b'{"customer_id": "c-7", "amount": 1200, "channel": "web"}'
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "3 derived": {"derived": DERIVED},
    "3 rules": {"rules": RULES},
    "3 derived + 3 rules": {"derived": DERIVED, "rules": RULES},
}


def processor(extra: dict[str, Any]) -> BrokerProcessor:
    doc = demo_registry_doc(free_port())
    doc["ensembles"], doc["audit"] = [], None
    model = doc["models"][0]
    model.update(features=["income", "debt_ratio", "tenure_months", "late_payments_12m"], **copy.deepcopy(extra))
    store = EmbeddedFeatureStore(
        {"customer:c-7": {"income": 81500, "debt_ratio": 0.31, "tenure_months": 12, "late_payments_12m": 1}}
    )
    return BrokerProcessor(parse_registry(doc), store)


async def cpu_per_request(proc: BrokerProcessor, n: int) -> float:
    message = HttpBody(body=BODY)
    start = time.process_time()
    for _ in range(n):
        ctx = RequestContext(route_name="credit-risk", content_type="application/json", request_id="r")
        await proc.request_body(message, ctx)
    return (time.process_time() - start) / n * 1e6


async def main(n: int, rounds: int) -> None:
    procs = {name: processor(extra) for name, extra in VARIANTS.items()}
    for proc in procs.values():
        await cpu_per_request(proc, n // 10)  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in procs}
    for _ in range(rounds):
        for name, proc in procs.items():
            samples[name].append(await cpu_per_request(proc, n))
    median = {name: statistics.median(values) for name, values in samples.items()}
    plain = median["plain"]
    print("| model | broker CPU µs/request | over plain | per expression |\n| --- | --: | --: | --: |")
    for name, micros in median.items():
        count = 6 if "+" in name else (3 if name != "plain" else 0)
        per = f"{(micros - plain) / count:.1f}" if count else "—"
        print(f"| {name} | {micros:.1f} | {micros - plain:+.1f} | {per} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.rules_cost", description=__doc__)
    parser.add_argument("-n", type=int, default=20_000, help="requests per sample")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are printed")
    args = parser.parse_args()
    asyncio.run(main(args.n, args.rounds))
