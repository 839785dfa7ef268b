"""The OIP GET endpoints: server liveness, readiness and metadata; model metadata and readiness.

Model metadata and readiness come from the backends, read through Envoy's egress
listener, so they tell the truth about what serves. The metadata's inputs are
rewritten to what the client must send: feature tensors hidden, the key tensor shown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import orjson

from extproc import wire
from extproc.core.oip.infer import OipPlan
from extproc.errors import BrokerError, ErrorCode
from extproc.registry import Registry

SERVER_NAME = "model-broker"
Kind = Literal["metadata", "ready"]


class BackendUnreachable(Exception):
    """No HTTP answer from the egress listener; raised by the egress adapter only."""


class BackendReader(Protocol):
    async def get(self, path: str) -> tuple[int, bytes]:
        """GET `path` on the egress listener: (status, body); `BackendUnreachable` when no HTTP answer."""
        ...


@dataclass(frozen=True, slots=True)
class ModelEndpoint:
    """One GET route: a model's (or one version's) metadata or readiness."""

    plan: OipPlan
    kind: Kind
    # The version the path names; None for the model as a whole (its live versions).
    version: str | None
    versions: tuple[str, ...]
    live_versions: tuple[str, ...]


def compile_endpoints(registry: Registry, plans: dict[str, OipPlan]) -> dict[str, ModelEndpoint]:
    """Every OIP model's GET endpoints, keyed by the route name Envoy reports."""
    endpoints: dict[str, ModelEndpoint] = {}
    for model in registry.models:
        plan = plans.get(model.name)
        if plan is None:
            continue
        versions = tuple(v.name for v in model.versions)
        live = tuple(v.name for v in model.live_versions)
        kinds: tuple[Kind, ...] = ("metadata", "ready")
        for kind in kinds:
            for version in (None, *versions):
                endpoints[wire.oip_route(kind, model.name, version)] = ModelEndpoint(
                    plan, kind, version, versions, live
                )
    return endpoints


def server_metadata(version: str) -> dict[str, Any]:
    """`GET /v2`: the broker is the server the client talks to."""
    return {"name": SERVER_NAME, "version": version, "extensions": []}


def egress_path(model: str, version: str, kind: Kind) -> str:
    """Where the egress listener serves one version's metadata or readiness (its cluster rewrites the path)."""
    base = f"/v2/models/{model}/versions/{version}"
    return base + "/ready" if kind == "ready" else base


def client_metadata(plan: OipPlan, backend: Any, versions: Sequence[str]) -> dict[str, Any]:
    """The backend's metadata as the broker's clients see it: the inputs they send, the outputs they get."""
    doc = backend if isinstance(backend, dict) else {}
    hidden = plan.injected | ({plan.key_input} if plan.key_input else set())
    inputs = [i for i in doc.get("inputs") or [] if not (isinstance(i, dict) and i.get("name") in hidden)]
    if plan.key_input is not None:
        inputs.insert(0, {"name": plan.key_input, "datatype": plan.key_datatype, "shape": [-1, 1]})
    return {
        "name": plan.model,
        "versions": list(versions),
        "platform": doc.get("platform") or "",
        "inputs": inputs,
        "outputs": doc.get("outputs") or [],
    }


async def _read(reader: BackendReader, path: str, budget_s: float) -> tuple[int, bytes]:
    """Failure policy: a backend unreachable or slower than the budget is not ready and has no metadata."""
    try:
        async with asyncio.timeout(budget_s):
            return await reader.get(path)
    except (BackendUnreachable, TimeoutError):
        return 503, b""


async def answer(
    endpoint: ModelEndpoint, reader: BackendReader, budget_s: float
) -> dict[str, Any] | BrokerError | None:
    """The 200 body (None for readiness), or why not: a model is ready when any live version is."""
    plan = endpoint.plan
    asked = (endpoint.version,) if endpoint.version is not None else endpoint.live_versions
    paths = [egress_path(plan.model, v, endpoint.kind) for v in asked]
    if endpoint.kind == "ready":
        replies = await asyncio.gather(*(_read(reader, p, budget_s) for p in paths))
        if any(status == 200 for status, _ in replies):
            return None
        what = (
            f"version {endpoint.version} of {plan.model} is"
            if endpoint.version
            else f"no live version of {plan.model} is"
        )
        return BrokerError(ErrorCode.MODEL_NOT_READY, f"{what} ready")
    replies = await asyncio.gather(*(_read(reader, p, budget_s) for p in paths))
    for status, body in replies:
        if status != 200:
            continue
        try:
            backend = orjson.loads(body)
        except orjson.JSONDecodeError:
            continue
        return client_metadata(plan, backend, asked if endpoint.version else endpoint.versions)
    return BrokerError(ErrorCode.UPSTREAM_UNAVAILABLE, f"no version of {plan.model} answered with its metadata")
