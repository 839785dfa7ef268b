"""Demo model services: each version answers with a score computed from the features it received.

They read the whole body before answering (as real models do), and echo the
features exactly as received so a newcomer can see what the broker injected.
A body may steer one demo model by name for tests and demos, e.g.
`"_demo": {"fraud": {"delay_ms": 500, "status": 500, "answer": {"score": 0.2}}}`:
wait, fail with that status, or override fields of the answer; `"echo_headers": true`
adds the request headers the model received to the answer (what Envoy let through). To the broker it is an
ordinary consumer field, passed through like any other; only the demo models act on it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from extproc import wire

JSON = "application/json"


def credit_score(version: str, features: dict[str, Any], amount: float) -> float:
    """A toy logistic score; v2 also weighs late payments, which only v2 declares."""
    income = float(features.get("income") or 0)
    debt = float(features.get("debt_ratio") or 0)
    tenure = float(features.get("tenure_months") or 0)
    z = 2.5 * debt + amount / max(income, 1.0) * 4 - tenure / 120
    if version == "v2":
        z += 0.4 * float(features.get("late_payments_12m") or 0)
    return round(1 / (1 + math.exp(-z + 1.5)), 4)


def fraud_score(version: str, features: dict[str, Any], amount: float) -> float:
    """A toy fraud score: late payments, debt and large amounts raise it; business customers lower it."""
    late = float(features.get("late_payments_12m") or 0)
    debt = float(features.get("debt_ratio") or 0)
    z = 0.6 * late + 1.5 * debt + amount / 10_000 - (0.5 if features.get("segment") == "business" else 0)
    return round(1 / (1 + math.exp(-z + 2.5)), 4)


# Which scorer a demo model name gets; any other name scores as credit-risk does.
SCORERS: dict[str, Callable[[str, dict[str, Any], float], float]] = {"fraud": fraud_score}


def model_app(model: str, version: str, path: str = "/predict") -> web.Application:
    scorer = SCORERS.get(model, credit_score)

    async def predict(request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            body = orjson.loads(raw)
            features = body.get("features") or {}
            amount = float(body.get("amount") or 0)
            steer = (body.get("_demo") or {}).get(model) or {}
            await asyncio.sleep(float(steer.get("delay_ms", 0)) / 1000)
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            return web.Response(status=400, body=orjson.dumps({"error": "bad input"}), content_type=JSON)
        if "status" in steer:
            failure = orjson.dumps({"error": "demo failure"})
            return web.Response(status=int(steer["status"]), body=failure, content_type=JSON)
        answer = {
            "model": model,
            "version": version,
            "score": scorer(version, features, amount),
            "features": features,
            **(steer.get("answer") or {}),
        }
        if steer.get("echo_headers"):
            answer["headers"] = {name.lower(): value for name, value in request.headers.items()}
        if steer.get("echo"):  # tests: the whole body as the model received it
            answer["received"] = body
        # Set by Envoy's authentication filter (client copies are dropped); absent in open mode.
        consumer = request.headers.get(wire.HEADER_CONSUMER)
        if consumer is not None:
            answer["consumer"] = consumer
        return web.Response(body=orjson.dumps(answer), content_type=JSON)

    app = web.Application()
    app.router.add_post(path, predict)
    return app


async def start_models(specs: list[tuple[str, str, str, int, str]]) -> list[web.AppRunner]:
    """Start one site per (model, version, host, port, path); the caller cleans the runners up."""
    runners = []
    for model, version, host, port, path in specs:
        runner = web.AppRunner(model_app(model, version, path), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        runners.append(runner)
    return runners
