"""Shadow results: the primary's and the shadow's answers, paired by request id and compared.

Envoy's recorder filter streams both answers to the control plane (the primary's from
the public route, the shadow's from the internal shadow listener). `ShadowPairs` and
`compare_answers` are pure; `ShadowRecorder` is the ext_proc stream edge.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import orjson
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest

from extproc import wire


@dataclass(frozen=True, slots=True)
class Answer:
    version: str
    body: bytes


@dataclass(frozen=True, slots=True)
class Comparison:
    """One request's two answers, side by side: what the shadow record and the agreement metrics hold."""

    request_id: str
    model: str
    primary_version: str
    shadow_version: str
    field: str
    match: bool
    abs_diff: float | None
    primary: Any
    shadow: Any

    def record(self) -> dict[str, Any]:
        return {"time": time.time(), "event": "shadow_compared", **{k: getattr(self, k) for k in self.__slots__}}


def _decode(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", errors="replace")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def compare_answers(field: str, primary: bytes, shadow: bytes) -> tuple[bool, float | None, Any, Any]:
    """(exact match of `field`, |difference| when both are numbers, both decoded answers)."""
    first, second = _decode(primary), _decode(shadow)
    a = first.get(field) if isinstance(first, dict) else None
    b = second.get(field) if isinstance(second, dict) else None
    x, y = _number(a), _number(b)
    return a is not None and a == b, (abs(x - y) if x is not None and y is not None else None), first, second


class ShadowPairs:
    """Answers waiting for their other half; a half whose twin never comes is dropped after `ttl_s`."""

    def __init__(self, ttl_s: float = 30.0, max_pending: int = 10_000) -> None:
        self._ttl_s = ttl_s
        self._max_pending = max_pending
        self._pending: dict[tuple[str, str], tuple[Answer | None, Answer | None, float]] = {}

    def add(
        self, model: str, request_id: str, is_shadow: bool, answer: Answer, now: float
    ) -> tuple[Answer, Answer] | None:
        key = (model, request_id)
        primary, shadow, since = self._pending.pop(key, (None, None, now))
        primary, shadow = (primary, answer) if is_shadow else (answer, shadow)
        if primary is not None and shadow is not None:
            return primary, shadow
        self._expire(now)
        if len(self._pending) < self._max_pending:  # bounded: under overload, comparisons are sampled
            self._pending[key] = (primary, shadow, since)
        return None

    def _expire(self, now: float) -> None:
        for key in [k for k, (_, _, since) in self._pending.items() if now - since > self._ttl_s]:
            del self._pending[key]


# (route name, version that answered, request id, body) of one answer Envoy streamed.
OnAnswer = Callable[[str, str, str, bytes], None]


class ShadowRecorder(ext_proc_grpc.ExternalProcessorServicer):  # type: ignore[misc]  # generated, untyped
    """Collects one answer per stream; never replies, since the filter runs in observability mode."""

    def __init__(self, on_answer: OnAnswer) -> None:
        self._on_answer = on_answer

    async def Process(  # noqa: N802  (the gRPC method name is fixed by the proto)
        self, request_iterator: AsyncIterator[ProcessingRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        attrs: dict[str, str] = {}
        chunks: list[bytes] = []
        async for request in request_iterator:
            for struct in request.attributes.values():
                attrs.update({k: v.string_value for k, v in struct.fields.items()})
            if request.WhichOneof("request") == "response_body":
                chunks.append(request.response_body.body)
                if request.response_body.end_of_stream:
                    self._on_answer(
                        attrs.get(wire.ATTR_ROUTE_NAME, ""),
                        attrs.get(wire.ATTR_UPSTREAM_VERSION, ""),
                        attrs.get(wire.ATTR_REQUEST_ID, ""),
                        b"".join(chunks),
                    )


def add_shadow_recorder(server: grpc.aio.Server, on_answer: OnAnswer) -> None:
    ext_proc_grpc.add_ExternalProcessorServicer_to_server(ShadowRecorder(on_answer), server)
