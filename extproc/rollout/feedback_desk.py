"""`POST /v1/feedback` on the control plane: join each truth to its audit record, persist, count.

Envoy authenticates the call as it does a model call (API key or JWT, the consumer in
`x-broker-consumer`) and forwards it to the control plane's feedback port; the control
plane is one process, so a label is counted once. Labels go to a JSON Lines file beside
the state file (fsynced before the answer) and are read back at start: tallies, metrics
and the report come out the same after a restart. A summary beside it is what every
worker's `GET /models` shows.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from extproc import metrics, wire
from extproc.adapters.audit_store import open_audit_store
from extproc.audit import AuditSinkUnavailable, Record, find_spooled, parse_lines
from extproc.errors import BrokerError, ErrorCode
from extproc.registry import Registry, write_json_atomically
from extproc.rollout.feedback import FeedbackBook, Truth, parse_feedback, score

log = logging.getLogger("model_broker.feedback")

# One lookup in the audit sink (S3 + DynamoDB, or local files); past it the truth is refused with 503.
LOOKUP_SECONDS = 10.0
# Largest body accepted (a batch of MAX_BATCH small items fits).
MAX_BODY_BYTES = 1024 * 1024

Find = Callable[[str], Awaitable[Record | None]]


def labels_path(state_file: str) -> Path:
    return Path(state_file).with_suffix(".feedback.jsonl")


def summary_path(state_file: str) -> Path:
    """What `GET /models` shows of the labels: per model and version, count and accuracy/MAE."""
    return Path(state_file).with_suffix(".accuracy.json")


def read_labels(state_file: str) -> list[dict[str, Any]]:
    path = labels_path(state_file)
    return parse_lines(path.read_bytes())[0] if path.exists() else []


class SummaryReader:
    """A worker's view of the summary file, re-read only when it changed (cheap on every `GET /models`)."""

    def __init__(self, state_file: str) -> None:
        self._path = summary_path(state_file)
        self._seen: tuple[int, int] | None = None
        self._doc: dict[str, Any] = {}

    def __call__(self) -> Mapping[str, Any]:
        try:
            stat = self._path.stat()
        except OSError:
            return {}
        if (stat.st_mtime_ns, stat.st_size) != self._seen:
            try:
                self._doc = orjson.loads(self._path.read_bytes()).get("models", {})
                self._seen = (stat.st_mtime_ns, stat.st_size)
            except (OSError, orjson.JSONDecodeError, AttributeError):
                return self._doc
        return self._doc


def audit_finder(registry: Registry) -> Find:
    """Spools on this host first (records not shipped yet), then the sink `audit show` reads."""
    conf = registry.audit
    if conf is None:

        async def nothing(_: str) -> Record | None:
            return None

        return nothing
    spool_root, store = Path(conf.spool.dir), open_audit_store(conf, reader=True)

    def lookup(request_id: str) -> Record | None:
        return find_spooled(spool_root, request_id) or store.show(request_id)

    async def find(request_id: str) -> Record | None:
        async with asyncio.timeout(LOOKUP_SECONDS):
            return await asyncio.to_thread(lookup, request_id)

    return find


class FeedbackDesk:
    def __init__(self, registry: Callable[[], Registry], state_file: str, find: Find) -> None:
        self._registry = registry
        self._state_file = state_file
        self._find = find
        self._lock = asyncio.Lock()  # one truth at a time: the idempotence check and the append agree
        self.book = FeedbackBook.of(read_labels(state_file))
        self._publish()

    async def submit(
        self, items: list[Truth | BrokerError], consumer: str | None
    ) -> list[dict[str, Any] | BrokerError]:
        results = [await self._one(item, consumer) for item in items]
        if any(isinstance(r, dict) and not r.get("duplicate") for r in results):
            await asyncio.to_thread(self._publish)
        return results

    async def _one(self, item: Truth | BrokerError, consumer: str | None) -> dict[str, Any] | BrokerError:
        if isinstance(item, BrokerError):
            metrics.FEEDBACK_POSTED.labels("", item.code.value).inc()
            return item
        seen = self._earlier(item)
        if seen is not None:
            return seen
        try:  # outside the lock: a slow audit sink must not hold up every other truth
            record = await self._find(item.request_id)
            shadow = await self._find(f"shadow:{item.request_id}") if record is not None else None
        except (AuditSinkUnavailable, TimeoutError, OSError) as exc:
            # Fail closed: a truth that cannot be joined now is not half-counted; the sender retries.
            log.warning("feedback for %s: audit trail unavailable: %s", item.request_id, exc)
            error = BrokerError(ErrorCode.AUDIT_UNAVAILABLE, "the audit trail cannot be read now; retry shortly")
            metrics.FEEDBACK_POSTED.labels(item.model or "", error.code.value).inc()
            return error
        label = score(self._registry(), item, record, shadow, now=time.time(), consumer=consumer)
        if isinstance(label, BrokerError):
            model = item.model or (str(record.get("model", "")) if record else "")
            metrics.FEEDBACK_POSTED.labels(model, label.code.value).inc()
            return label
        async with self._lock:  # the idempotence check and the append agree: a label is counted once
            seen = self._earlier(item)
            if seen is not None:
                return seen
            await asyncio.to_thread(self._append, label)
            self.book.add(label)
        metrics.FEEDBACK_POSTED.labels(label["model"], "labelled").inc()
        return _result(label, duplicate=False)

    def _earlier(self, item: Truth) -> dict[str, Any] | BrokerError | None:
        """The answer for a request already labelled: the same truth again, or a refused change."""
        earlier = self.book.earlier(item)
        if earlier is None:
            return None
        model = self.book.labels[item.request_id]["model"]
        metrics.FEEDBACK_POSTED.labels(model, "duplicate" if isinstance(earlier, dict) else earlier.code.value).inc()
        return _result(earlier, duplicate=True) if isinstance(earlier, dict) else earlier

    def _append(self, label: Mapping[str, Any]) -> None:
        path = labels_path(self._state_file)
        with path.open("ab") as out:
            out.write(orjson.dumps(label) + b"\n")
            out.flush()
            os.fsync(out.fileno())

    def _publish(self) -> None:
        """Metrics and the summary file from the tallies."""
        summary = self.book.summary()
        for model, entry in summary.items():
            key = "accuracy" if entry["kind"] == "classification" else "mae"
            for role, versions in (("served", entry["versions"]), ("shadow", entry["shadows"])):
                for version, counted in versions.items():
                    metrics.set_feedback(
                        model, version, role, kind=entry["kind"], labelled=counted["labelled"], value=counted[key]
                    )
        write_json_atomically(summary_path(self._state_file), {"models": summary})


def _result(label: Mapping[str, Any], duplicate: bool) -> dict[str, Any]:
    keep = ("request_id", "model", "version", "truth", "answer", "correct", "abs_error", "shadow")
    return {**{k: label[k] for k in keep}, "duplicate": duplicate}


def _error(error: BrokerError, request_id: str) -> web.Response:
    body = orjson.dumps(error.to_json(request_id))
    return web.Response(status=error.status, body=body, content_type="application/json")


def feedback_app(desk: FeedbackDesk) -> web.Application:
    """One route: `POST /v1/feedback`, one item (its status) or a batch (200, a status per item)."""

    async def post(request: web.Request) -> web.Response:
        request_id = request.headers.get("x-request-id", "")
        try:
            doc = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            return _error(BrokerError(ErrorCode.INVALID_JSON, f"the body is not JSON: {exc}"), request_id)
        parsed = parse_feedback(doc)
        if isinstance(parsed, BrokerError):
            return _error(parsed, request_id)
        items, batch = parsed
        results = await desk.submit(items, request.headers.get(wire.HEADER_CONSUMER) or None)
        if not batch:
            (only,) = results
            if isinstance(only, BrokerError):
                return _error(only, request_id)
            return web.Response(body=orjson.dumps(only), content_type="application/json")
        answers = [
            {"status": r.status, **r.to_json(request_id)} if isinstance(r, BrokerError) else {"status": 200, **r}
            for r in results
        ]
        labelled = sum(1 for r in results if isinstance(r, dict) and not r["duplicate"])
        return web.Response(
            body=orjson.dumps({"labelled": labelled, "results": answers}), content_type="application/json"
        )

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_post(wire.PATH_FEEDBACK, post)
    return app


async def serve_feedback(registry: Registry, current: Callable[[], Registry]) -> tuple[FeedbackDesk, web.AppRunner]:
    """The desk (labels read back from disk) behind `control_plane.feedback_port`; `current`: the live registry."""
    conf = registry.control_plane
    desk = FeedbackDesk(current, conf.state_file, audit_finder(registry))
    runner = web.AppRunner(feedback_app(desk), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, conf.address, conf.feedback_port).start()
    return desk, runner
