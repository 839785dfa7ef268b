"""Ensembles: one body, every member model called concurrently through Envoy's egress listener.

Plans are compiled once at load. `run_ensemble` fetches the union of the
members' features in one store call, calls each member under its own timeout
and the ensemble's deadline, and returns every member's outcome for `aggregate.py`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from time import perf_counter
from typing import Any, Protocol

import orjson

from extproc import wire
from extproc.core.body import inject_features
from extproc.core.ensemble.aggregate import Combiner, MemberFailure, MemberOutcome, MemberResult
from extproc.core.entity import EntityRef, KeyPlan, union_of
from extproc.core.features import FeatureRow, Features, FeatureStore, narrow
from extproc.core.logic import derived_features
from extproc.core.oip import member_body, member_view
from extproc.core.routing import ModelRoute
from extproc.errors import BrokerError, ErrorCode, FeatureStoreUnavailable
from extproc.registry import Ensemble, Registry


class MemberUnavailable(Exception):
    """The egress listener refused or dropped the call; raised by the egress adapter only."""


@dataclass(frozen=True, slots=True)
class MemberReply:
    """What Envoy answered for one member call, headers reduced to what the broker reads."""

    status: int
    body: bytes
    version: str
    request_id: str


class MemberClient(Protocol):
    async def post(self, path: str, body: bytes, parent_request_id: str) -> MemberReply:
        """POST `body` to `path` on the egress listener; `MemberUnavailable` when no HTTP answer."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class MemberPlan:
    route: ModelRoute
    # The model's public path; the egress listener serves the same path without ext_proc.
    path: str
    timeout_s: float
    # OIP members: the output tensor the combiner reads, asked for in the member's request.
    output: str | None = None


@dataclass(frozen=True, slots=True)
class EnsemblePlan:
    name: str
    members: tuple[MemberPlan, ...]
    # Union over the members: fetched in one store call.
    features: tuple[str, ...]
    deadline_s: float
    min_success: int
    combiner: Combiner
    # The members' join keys together: one entity lookup serves them all.
    keys: KeyPlan


def _plan(ensemble: Ensemble, registry: Registry, routes: dict[str, ModelRoute]) -> EnsemblePlan:
    members = []
    for member in ensemble.members:
        model = registry.model(member.model)
        if model is None:  # parse_registry already rejected this; kept for the type checker
            raise ValueError(f"ensemble {ensemble.name}: unknown model {member.model}")
        output = member.output.tensor if member.output is not None else None
        members.append(MemberPlan(routes[model.name], model.path, member.timeout_ms / 1000, output))
    union = dict.fromkeys(name for m in members for name in m.route.features)
    return EnsemblePlan(
        name=ensemble.name,
        members=tuple(members),
        features=tuple(union),
        deadline_s=ensemble.deadline_ms / 1000,
        min_success=ensemble.required_successes,
        combiner=Combiner(
            method=ensemble.aggregation.method,
            field=ensemble.aggregation.field,
            weights={m.model: m.weight for m in ensemble.members},
            outputs={m.model: (m.output.tensor, m.output.index) for m in ensemble.members if m.output is not None},
        ),
        keys=union_of([m.route.keys for m in members]),
    )


def compile_ensembles(registry: Registry, routes: dict[str, ModelRoute]) -> dict[str, EnsemblePlan]:
    """Plans keyed by the route name Envoy reports for each ensemble's public route."""
    return {wire.ensemble_route(e.name): _plan(e, registry, routes) for e in registry.ensembles}


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def reply_outcome(model: str, reply: MemberReply, latency_s: float, parent_request_id: str) -> MemberOutcome:
    """A member's HTTP answer as a result or a failure: 2xx with JSON is a result, anything else is not."""
    error: BrokerError | None = None
    if reply.status == 504:
        error = BrokerError(ErrorCode.UPSTREAM_TIMEOUT, "the model did not answer within its Envoy route timeout")
    elif reply.status == 503:
        error = BrokerError(ErrorCode.UPSTREAM_UNAVAILABLE, "the model is unavailable (503 from Envoy)")
    elif not 200 <= reply.status < 300:
        error = BrokerError(ErrorCode.UPSTREAM_ERROR, f"the model answered HTTP {reply.status}")
    else:
        try:
            output: Any = orjson.loads(reply.body)
        except orjson.JSONDecodeError:
            error = BrokerError(ErrorCode.UPSTREAM_ERROR, f"the model answered HTTP {reply.status} without JSON")
        else:
            return MemberResult(
                model, reply.version, _ms(latency_s), output, reply.request_id, parent_request_id, reply.status
            )
    return MemberFailure(
        model, error, _ms(latency_s), reply.request_id, parent_request_id, reply.status, version=reply.version
    )


async def _call(client: MemberClient, member: MemberPlan, body: bytes, parent_request_id: str) -> MemberOutcome:
    """One member call. Failure policy: a member's failure is its error entry, never the ensemble's crash."""
    model = member.route.model
    started = perf_counter()
    try:
        async with asyncio.timeout(member.timeout_s):
            reply = await client.post(member.path, body, parent_request_id)
    except TimeoutError:
        error = BrokerError(ErrorCode.UPSTREAM_TIMEOUT, f"no answer within {_ms(member.timeout_s):g} ms")
    except MemberUnavailable as exc:
        error = BrokerError(ErrorCode.UPSTREAM_UNAVAILABLE, str(exc))
    else:
        return reply_outcome(model, reply, perf_counter() - started, parent_request_id)
    return MemberFailure(model, error, _ms(perf_counter() - started), parent_request_id=parent_request_id)


async def _union_features(store: FeatureStore, plan: EnsemblePlan, ref: EntityRef) -> tuple[FeatureRow | None, str]:
    """The members' features in one store call, and why the store failed ("" when it did not)."""
    try:
        return (await store.fetch_rows([ref.key], plan.features))[0], ""
    except FeatureStoreUnavailable as exc:
        return None, str(exc)


def _settled(
    member: MemberPlan,
    doc: dict[str, Any],
    label: str,
    found: FeatureRow | None,
    *,
    unavailable: str,
    started_at: float,
) -> Features | BrokerError:
    """The member's features after its store policies, with its derived features (its segment rules do
    not apply: the member is called through its egress route, whose weighted split picks the version)."""
    route = member.route
    features, degraded = route.settle_unavailable(unavailable) if unavailable else route.settle_features(found, label)
    logic = member.route.logic
    if isinstance(features, BrokerError) or logic is None:
        return features
    if route.oip is not None:  # `body` as for an OIP request of the one row the member is sent
        doc = member_view(route.oip.key_input, label)
    return derived_features(logic, doc, features, started_at=started_at, degraded=degraded)


def _member_body(
    member: MemberPlan, doc: dict[str, Any], key: str, features: Features | BrokerError
) -> bytes | BrokerError:
    """The request shaped for the member's protocol: the JSON body with features, or OIP tensors."""
    if isinstance(features, BrokerError):
        return features
    route = member.route
    if route.oip is not None:
        return member_body(route.oip, key, features, route.join_key, member.output)
    return inject_features(dict(doc), route.inject_as, features)


async def run_ensemble(
    plan: EnsemblePlan,
    doc: dict[str, Any],
    ref: EntityRef,
    *,
    store: FeatureStore,
    client: MemberClient,
    parent_request_id: str,
    started_at: float = 0.0,
) -> list[MemberOutcome] | BrokerError:
    """Every member's outcome in declared order, or the one feature error all members share.

    The deadline counts from the body's arrival, feature fetch included.
    """
    deadline = perf_counter() + plan.deadline_s
    union, unavailable = await _union_features(store, plan, ref)
    settled = [
        _settled(m, doc, ref.label, narrow(union, m.route.features), unavailable=unavailable, started_at=started_at)
        for m in plan.members
    ]
    bodies = [_member_body(m, doc, ref.label, f) for m, f in zip(plan.members, settled, strict=True)]
    errors = [b for b in bodies if isinstance(b, BrokerError)]
    if len(errors) == len(bodies):
        # No member can be called (store down, entity unknown): the client hears it as for a model.
        return errors[0]
    fanout_started = perf_counter()
    tasks: dict[int, asyncio.Task[MemberOutcome]] = {}
    for i, (member, body) in enumerate(zip(plan.members, bodies, strict=True)):
        if not isinstance(body, BrokerError):
            tasks[i] = asyncio.create_task(_call(client, member, body, parent_request_id))
    try:
        await asyncio.wait(tasks.values(), timeout=max(0.0, deadline - perf_counter()))
    finally:
        # Cancelled means cancelled: at the deadline, or when Envoy drops the stream, no member
        # call outlives the request (aiohttp closes its connection, Envoy resets the model's).
        for running in tasks.values():
            running.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    cut = BrokerError(ErrorCode.DEADLINE_EXCEEDED, f"cancelled at the ensemble deadline ({_ms(plan.deadline_s):g} ms)")
    cut_after_ms = _ms(perf_counter() - fanout_started)
    outcomes: list[MemberOutcome] = []
    for i, (member, features, body) in enumerate(zip(plan.members, settled, bodies, strict=True)):
        sent = None if isinstance(features, BrokerError) else features
        if isinstance(body, BrokerError):  # never called: its feature policy or its tensors refused
            outcomes.append(MemberFailure(member.route.model, body, 0.0, parent_request_id=parent_request_id))
        elif not tasks[i].cancelled():
            outcomes.append(replace(tasks[i].result(), features=sent))
        else:
            cut_off = MemberFailure(member.route.model, cut, cut_after_ms, parent_request_id=parent_request_id)
            outcomes.append(replace(cut_off, features=sent))
    return outcomes
