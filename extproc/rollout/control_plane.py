"""The rollout control plane: one per deployment, the source of truth for live weights.

It serves RTDS to every Envoy and every broker worker (gRPC), the authenticated
admin API (HTTP), and persists each change to the state file before anyone hears
of it, so a restarted Envoy, broker or control plane comes back with the changed
split. Beside the workers of `serve` on one machine; its own pod on Kubernetes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import orjson
import uvloop
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)

from extproc import metrics, wire
from extproc.errors import BrokerError
from extproc.registry import Registry, RolloutPolicy, load_registry
from extproc.registry.reload import follow_registry_file
from extproc.rollout import discovery
from extproc.rollout.accuracy import Verdict, gate_canary
from extproc.rollout.admin_api import add_metrics_service, admin_app
from extproc.rollout.events import events_path
from extproc.rollout.feedback_desk import FeedbackDesk, serve_feedback
from extproc.rollout.health import (
    Health,
    OutcomeWindow,
    judge,
    next_step,
    outcomes_by_cluster,
    promotion_weights,
    rollback_weights,
)
from extproc.rollout.shadow import Answer, Comparison, ShadowPairs, add_shadow_recorder, compare_answers
from extproc.rollout.state import RolloutState, load_state, save_state
from extproc.rollout.trail import ControlPlaneTrail, open_trail
from extproc.rollout.weights import (
    LiveWeights,
    change_weights,
    declared_weights,
    merge_overrides,
    newly_live,
    runtime_layer,
)
from extproc.rollout.xds import RuntimeHub, add_runtime_service

log = logging.getLogger("model_broker.control_plane")

# How long a change waits for every connected Envoy (and, first, broker) to acknowledge it.
ACK_TIMEOUT_SECONDS = 5.0
# The `source` of a change made by automatic rollback (operators' changes say "admin").
ROLLBACK = "rollback"
PROMOTION = "promotion"
# The `source` of a weight change made by editing the registry file (or its ConfigMap).
EDIT = "edit"


def shadow_path(state_file: str) -> Path:
    """Primary and shadow answers of each compared request, with the shadow's version, for the audit."""
    return Path(state_file).with_suffix(".shadow.jsonl")


class ControlPlane:
    """Live weights: validated, persisted, then pushed; changes are serialised by one lock."""

    def __init__(self, registry: Registry, state: RolloutState) -> None:
        self._state = state
        # The audit trail, once opened, when the registry has one: events and comparisons beside the executions.
        self.trail: ControlPlaneTrail | None = None
        self._lock = asyncio.Lock()
        # Models with an automatic change in flight: exports from other Envoys must not start another.
        self._changing: set[str] = set()
        # When each model's split last changed: promotion waits `promote_after_seconds` from there.
        self._stage_since: dict[str, float] = {}
        self._windows: dict[str, OutcomeWindow] = {}
        self._events = events_path(registry.control_plane.state_file)
        self._shadow_log = shadow_path(registry.control_plane.state_file)
        self._shadow_pairs = ShadowPairs()
        # Canaries that passed their last step (once per split); the registry follower acts on them.
        self._passed: set[str] = set()
        self.on_passed: Callable[[str, str], Awaitable[None]] | None = None
        self.on_rolled_back: Callable[[str, str, dict[str, Any]], Awaitable[None]] | None = None
        self.describe_registries: Callable[[], dict[str, Any]] = dict
        self._hooks: set[asyncio.Task[None]] = set()
        # Ground truth (when a model declares `feedback`): labels per version, read by the accuracy gate.
        self.feedback: FeedbackDesk | None = None
        self._verdicts: dict[str, dict[str, Any]] = {}
        if self._adopt(registry):  # a new revision, so nobody mistakes the new split for one it acknowledged
            self._state = replace(self._state, revision=self._state.revision + 1)
            save_state(registry.control_plane.state_file, self._state)
        self.hub = RuntimeHub(runtime_layer(self._live), self._state.revision)
        self.brokers = RuntimeHub(runtime_layer(self._live), self._state.revision)

    def _adopt(self, registry: Registry) -> bool:
        """Serve `registry`: its weights with every still-fitting override; True if one was dropped."""
        live, dropped = merge_overrides(registry, self._state.overrides, self._state.declared)
        for reason in dropped:
            log.warning("ignoring a saved weight override that no longer fits the registry: %s", reason)
        if dropped:
            kept = {model: weights for model, weights in self._state.overrides.items() if live.get(model) == weights}
            declared = {model: self._state.declared[model] for model in kept if model in self._state.declared}
            self._state = RolloutState(self._state.revision, kept, declared)
        self.registry, self._live, self._declared = registry, live, declared_weights(registry)
        self._policies = {m.name: m.rollout for m in registry.models if m.rollout is not None and m.rollout.canary}
        # The version each policy judges: declared, or the registry's challenger while one is in flight.
        self._canary = {name: policy.canary or "" for name, policy in self._policies.items()}
        self._versions = {
            wire.version_cluster(m.name, v.name): (m.name, v.name) for m in registry.models for v in m.versions
        }
        now = time.monotonic()
        self._stage_since = {model: self._stage_since.get(model, now) for model in self._policies}
        windows = {wire.version_cluster(m, self._canary[m]): p.window_seconds for m, p in self._policies.items()}
        self._windows = {c: self._windows.get(c) or OutcomeWindow(seconds) for c, seconds in windows.items()}
        for model, weights in live.items():
            metrics.set_weights(model, weights)
        return bool(dropped)

    async def use_registry(self, registry: Registry) -> None:
        """An edited registry file: new models and versions go live at their declared weights."""
        async with self._lock:
            before = self.live
            self._adopt(registry)
            self._state = replace(self._state, revision=self._state.revision + 1)
            await asyncio.to_thread(save_state, registry.control_plane.state_file, self._state)
            await self._publish(before, self._state.revision)

    async def use_edited_registry(self, registry: Registry) -> None:
        """The registry file was edited: serve it, and record each declared split it changed (source `edit`).

        Only models with declared versions: a registry-followed model's versions change through the
        versions file, and the follower records those itself (source `registry`).
        """
        before = self._declared
        await self.use_registry(registry)
        for model in (m for m in registry.models if m.registry is None):
            was, now = before.get(model.name, {}), self._declared.get(model.name, {})
            if was != now:
                live = self.live.get(model.name, {})
                self.record_event(
                    "weights_changed", model.name, EDIT, before=was, after=now, live=live, revision=self.hub.revision
                )

    async def _publish(self, before: LiveWeights, revision: int) -> None:
        """Brokers first; a version that had no traffic reaches Envoy once every broker has it."""
        layer = runtime_layer(self._live)
        self.brokers.publish(layer, revision)
        if newly_live(before, self._live):
            await self.brokers.wait_acked(revision, ACK_TIMEOUT_SECONDS)
        self.hub.publish(layer, revision)

    @property
    def live(self) -> LiveWeights:
        return {model: dict(weights) for model, weights in self._live.items()}

    def describe(self) -> dict[str, Any]:
        return {
            "revision": self.hub.revision,
            "models": self.live,
            "envoys": self.hub.subscribers(),
            "brokers": self.brokers.subscribers(),
            "model_registries": self.describe_registries(),
            "accuracy_gates": dict(self._verdicts),
        }

    async def set_weights(
        self, model: str, proposed: Mapping[str, object], source: str, detail: Mapping[str, Any] | None = None
    ) -> dict[str, Any] | BrokerError:
        """Validate, persist, push to every broker and Envoy, then wait (bounded) for their acknowledgements.

        A version that had no traffic reaches the brokers first: Envoy sends it
        requests only once every broker fetches its features.
        """
        async with self._lock:  # checked inside: a registry reload may change the versions
            checked = change_weights(self.registry, model, proposed)
            if isinstance(checked, BrokerError):
                return checked
            before = self.live
            after = {**before, model: checked}
            revision = self._state.revision + 1
            declared = {**self._state.declared, model: self._declared[model]}
            state = RolloutState(revision, {**self._state.overrides, model: checked}, declared)
            await asyncio.to_thread(save_state, self.registry.control_plane.state_file, state)
            self._state, self._live = state, after
            await self._publish(before, revision)
            metrics.set_weights(model, checked)
            self._forget_outcomes(model)
            event = {ROLLBACK: "rollback", PROMOTION: "promotion"}.get(source, "weights_changed")
            self.record_event(
                event, model, source, before=before[model], after=checked, revision=revision, **(detail or {})
            )
        (acked, connected), (brokers_acked, brokers) = await asyncio.gather(
            self.hub.wait_acked(revision, ACK_TIMEOUT_SECONDS), self.brokers.wait_acked(revision, ACK_TIMEOUT_SECONDS)
        )
        return {
            "model": model,
            "weights": checked,
            "revision": revision,
            "envoys_acked": acked,
            "envoys": connected,
            "brokers_acked": brokers_acked,
            "brokers": brokers,
        }

    def _forget_outcomes(self, model: str) -> None:
        """A new split starts a new judgement: errors from before it must not roll it back."""
        policy = self._policies.get(model)
        self._passed.discard(model)
        if policy is not None:
            self._stage_since[model] = time.monotonic()
            self._windows[wire.version_cluster(model, self._canary[model])] = OutcomeWindow(policy.window_seconds)

    async def observe(self, export: ExportMetricsServiceRequest) -> None:
        """One Envoy's stats for the last flush interval: count them, then judge every canary."""
        now = time.monotonic()
        for cluster, outcomes in outcomes_by_cluster(export, set(self._versions)).items():
            model, version = self._versions[cluster]
            metrics.record_version_outcomes(model, version, outcomes.requests, outcomes.errors)
            if cluster in self._windows:
                self._windows[cluster].add(now, outcomes)
        for model, policy in self._policies.items():
            canary = self._canary[model]
            if self._live[model].get(canary, 0) == 0 or model in self._changing:
                continue
            health = self._windows[wire.version_cluster(model, canary)].health(now)
            breach = judge(policy, health)
            verdict = self._accuracy(model, policy, canary) if breach is None else None
            if breach is not None:
                await self._roll_back(model, canary, breach.reason, breach.detail())
            elif verdict is not None and verdict.decision == "fail":
                await self._roll_back(model, canary, verdict.reason, {"reason": verdict.reason, **verdict.detail})
            elif (
                health.requests >= policy.min_requests
                and now - self._stage_since[model] >= policy.promote_after_seconds
                and (verdict is None or verdict.decision == "pass")
            ):
                await self._promote(model, policy, health, verdict)

    def _accuracy(self, model: str, policy: RolloutPolicy, canary: str) -> Verdict | None:
        """The canary against the champion on fed-back truth (None: no gate); the last verdict is in `describe`."""
        conf = self.registry.model(model)
        if policy.accuracy is None or self.feedback is None or conf is None or conf.feedback is None:
            return None
        verdict = gate_canary(
            policy.accuracy, conf.feedback.kind, self.feedback.book, model, weights=self._live[model], canary=canary
        )
        if verdict is not None:
            self._verdicts[model] = {"canary": canary, "decision": verdict.decision, "reason": verdict.reason}
            self._verdicts[model] |= verdict.detail
        return verdict

    def _hook(self, call: Awaitable[None]) -> None:
        """Run a follower's hook beside the stats export that triggered it (it may call the registry)."""

        async def run() -> None:
            try:
                await call
            except Exception:
                log.exception("rollout hook failed")

        task = asyncio.create_task(run())
        self._hooks.add(task)
        task.add_done_callback(self._hooks.discard)

    async def _promote(self, model: str, policy: RolloutPolicy, health: Health, verdict: Verdict | None) -> None:
        canary = self._canary[model]
        step = next_step(policy, self._live[model], canary)
        if step is None:
            if self.on_passed is not None and model not in self._passed:
                self._passed.add(model)
                log.info("%s: canary %s passed its last step", model, canary)
                self._hook(self.on_passed(model, canary))
            return
        self._changing.add(model)
        try:
            detail = {
                "canary": canary,
                "percent": step,
                "requests": health.requests,
                "errors": health.errors,
                "error_rate": round(health.error_rate, 4),
                "p95_ms": health.p95_ms,
            }
            if verdict is not None:
                detail["accuracy"] = {"reason": verdict.reason, **verdict.detail}
            log.info("promoting %s: canary %s healthy, to %d%%", model, canary, step)
            await self.set_weights(model, promotion_weights(self._live[model], canary, step), PROMOTION, detail)
        finally:
            self._changing.discard(model)

    async def _roll_back(self, model: str, canary: str, reason: str, detail: dict[str, Any]) -> None:
        """`detail` (with its `reason`: error_rate, p95_latency, accuracy, mae) goes in the event and the tag."""
        self._changing.add(model)
        try:
            log.warning("rolling back %s: canary %s breached %s: %s", model, canary, reason, detail)
            result = await self.set_weights(
                model, rollback_weights(self._live[model], canary), ROLLBACK, {"canary": canary, **detail}
            )
            if isinstance(result, BrokerError):  # cannot happen for a registry-valid split; loud if it does
                log.error("rollback of %s refused: %s", model, result.message)
            else:
                metrics.ROLLBACKS.labels(model, canary, reason).inc()
                if self.on_rolled_back is not None:
                    self._hook(self.on_rolled_back(model, canary, detail))
        finally:
            self._changing.discard(model)

    def record_answer(self, route: str, version: str, request_id: str, body: bytes) -> None:
        """One model answer from Envoy's recorder; once both halves of a request are in, compare them."""
        is_shadow = route.startswith(wire.SHADOW_ROUTE_PREFIX)
        model = self.registry.model(route.removeprefix(wire.SHADOW_ROUTE_PREFIX))
        if model is None or model.shadow is None or not request_id:
            return
        pair = self._shadow_pairs.add(model.name, request_id, is_shadow, Answer(version, body), time.monotonic())
        if pair is None:
            return
        primary, shadow = pair
        match, abs_diff, first, second = compare_answers(model.shadow.compare_field, primary.body, shadow.body)
        comparison = Comparison(
            request_id,
            model.name,
            primary.version,
            shadow.version,
            model.shadow.compare_field,
            match,
            abs_diff,
            first,
            second,
        )
        metrics.record_shadow(model.name, shadow.version, match, abs_diff)
        record = comparison.record()
        with self._shadow_log.open("ab") as out:
            out.write(orjson.dumps(record) + b"\n")
        if self.trail is not None:
            self.trail.shadow(record)

    def record_event(self, event: str, model: str, source: str, **fields: Any) -> None:
        """One JSON line per rollout event beside the state file, and one record in the audit trail."""
        record = {"time": time.time(), "event": event, "model": model, "source": source, **fields}
        log.info("rollout event %s", json.dumps(record, sort_keys=True))
        with self._events.open("ab") as out:
            out.write(orjson.dumps(record) + b"\n")
        if self.trail is not None:
            self.trail.rollout(event, model, source, fields)


# Runs beside the control plane for its lifetime (the model-registry follower, wired in `extproc.process`).
Companion = Callable[[ControlPlane, str], Coroutine[Any, Any, None]]


async def serve_control_plane(registry_file: str, registry: Registry, companion: Companion | None = None) -> None:
    conf = registry.control_plane
    plane = ControlPlane(registry, load_state(conf.state_file))
    server = grpc.aio.server()
    add_runtime_service(server, plane.hub, plane.brokers)
    add_metrics_service(server, plane)
    add_shadow_recorder(server, plane.record_answer)
    server.add_insecure_port(f"{conf.address}:{conf.port}")
    await server.start()
    token = os.environ.get(discovery.TOKEN_ENV) or secrets.token_urlsafe(32)
    runner = web.AppRunner(admin_app(plane, token), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, conf.address, conf.admin_port).start()
    url = f"http://{conf.address}:{conf.admin_port}"
    feedback_runner = None
    if registry.takes_feedback:  # opened at start: a model that declares `feedback` later needs a restart
        plane.feedback, feedback_runner = await serve_feedback(registry, lambda: plane.registry)
    announced = discovery.announce(discovery.AdminEndpoint(url, token, os.getpid(), registry_file))
    log.info("control plane: RTDS on %s:%d, admin API on %s", conf.address, conf.port, url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()
    edits = follow_registry_file(registry_file, lambda: plane.registry, plane.use_edited_registry)
    reloading = asyncio.create_task(edits)
    # Once serving: its AWS client must not delay the live weights every Envoy and worker waits for.
    plane.trail = await asyncio.to_thread(open_trail, registry)
    shipping = asyncio.create_task(plane.trail.run(stop)) if plane.trail is not None else None
    beside = asyncio.create_task(companion(plane, registry_file)) if companion is not None else None
    try:
        while not stop.is_set() and os.getppid() == parent:  # stop with the supervisor, even if it was killed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    finally:
        reloading.cancel()
        if beside is not None:
            beside.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await beside
        announced.unlink(missing_ok=True)
        await runner.cleanup()
        if feedback_runner is not None:
            await feedback_runner.cleanup()
        await server.stop(1.0)
        stop.set()
        if shipping is not None:
            await shipping


def run_control_plane(config_path: str, companion: Companion | None = None) -> None:
    """Process entry point (the supervisor spawns this beside the workers)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    registry = load_registry(config_path, envoy_files=False)
    uvloop.run(serve_control_plane(str(Path(config_path).resolve()), registry, companion))
