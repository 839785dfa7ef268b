"""The FastAPI + httpx gateway most teams would write for the same enrichment, run by uvicorn.

Idiomatic rather than tuned: a pydantic request model, a shared
`httpx.AsyncClient` and Redis client opened in the lifespan, the answer passed
through as bytes. Configured by environment, as uvicorn apps usually are:
BENCH_REDIS_URL, BENCH_BACKEND_URL. Run: `uvicorn bench.gateways.fastapi_gateway:app --workers 2`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bench import workload


class PredictRequest(BaseModel):
    # Consumers may send more fields; the model gets them all.
    model_config = ConfigDict(extra="allow")

    customer_id: str
    amount: float | None = None


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.redis = Redis.from_url(os.environ["BENCH_REDIS_URL"], socket_timeout=workload.STORE_TIMEOUT_MS / 1000)
    app.state.http = httpx.AsyncClient(timeout=15.0)
    app.state.backend_url = os.environ["BENCH_BACKEND_URL"]
    yield
    await app.state.http.aclose()
    await app.state.redis.aclose()


app = FastAPI(lifespan=lifespan)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post(workload.MODEL_PATH)
async def predict(body: PredictRequest, request: Request) -> Response:
    try:
        values = await request.app.state.redis.hmget(workload.store_key(body.customer_id), list(workload.FEATURES))
    except (RedisError, OSError):
        raise HTTPException(503, "feature store unavailable") from None
    if all(v is None for v in values):
        raise HTTPException(404, "unknown customer")
    doc = body.model_dump()
    doc[workload.INJECT_AS] = {
        name: None if raw is None else workload.decode_value(raw)
        for name, raw in zip(workload.FEATURES, values, strict=True)
    }
    upstream = await request.app.state.http.post(request.app.state.backend_url, json=doc)
    return Response(content=upstream.content, status_code=upstream.status_code, media_type=workload.JSON)
