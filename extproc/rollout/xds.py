"""Runtime discovery (RTDS): the live weights as one runtime layer pushed to every Envoy and broker.

`runtime_response` is a pure builder; `RuntimeHub` keeps the current layer and one
queue per subscriber, and knows which revision each acknowledged. Envoys and
broker workers speak the same protocol but get separate hubs, so a version's
features can reach every broker before any Envoy sends it traffic.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse
from envoy.service.runtime.v3 import rtds_pb2_grpc
from envoy.service.runtime.v3.rtds_pb2 import Runtime
from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.struct_pb2 import Struct

from extproc import wire

log = logging.getLogger("model_broker.xds")

RUNTIME_TYPE_URL = "type.googleapis.com/envoy.service.runtime.v3.Runtime"


def runtime_response(layer: Mapping[str, int], revision: int, nonce: str) -> DiscoveryResponse:
    """One RTDS answer: the whole layer (SotW), versioned by the state revision."""
    values = Struct()
    values.update(dict(layer))
    resource = AnyProto()
    resource.Pack(Runtime(name=wire.RUNTIME_LAYER, layer=values))
    return DiscoveryResponse(version_info=str(revision), resources=[resource], type_url=RUNTIME_TYPE_URL, nonce=nonce)


@dataclass(eq=False)
class Subscriber:
    """One Envoy's (or broker worker's) RTDS stream."""

    node: str
    updates: asyncio.Queue[DiscoveryResponse] = field(default_factory=asyncio.Queue)
    acked: int = -1


class RuntimeHub:
    """The current runtime layer and every subscriber of one kind (Envoys, or brokers)."""

    def __init__(self, layer: Mapping[str, int], revision: int) -> None:
        self._layer = dict(layer)
        self._revision = revision
        self._nonces = itertools.count(1)
        self._subscribers: set[Subscriber] = set()
        self._acked = asyncio.Condition()

    @property
    def revision(self) -> int:
        return self._revision

    def subscribers(self) -> list[dict[str, Any]]:
        return [{"node": s.node, "acked_revision": s.acked} for s in self._subscribers]

    def publish(self, layer: Mapping[str, int], revision: int) -> None:
        self._layer, self._revision = dict(layer), revision
        for sub in self._subscribers:
            sub.updates.put_nowait(self._response())

    async def wait_acked(self, revision: int, timeout_s: float) -> tuple[int, int]:
        """Until every subscriber acknowledged `revision` (or the time is up): (acked, connected)."""

        def count() -> int:
            return sum(s.acked >= revision for s in self._subscribers)

        async with self._acked:
            try:
                async with asyncio.timeout(timeout_s):
                    await self._acked.wait_for(lambda: count() == len(self._subscribers))
            except TimeoutError:
                pass
            return count(), len(self._subscribers)

    def _response(self) -> DiscoveryResponse:
        return runtime_response(self._layer, self._revision, str(next(self._nonces)))

    async def _read(self, requests: AsyncIterator[DiscoveryRequest], sub: Subscriber) -> None:
        async for request in requests:
            if request.node.id:
                sub.node = request.node.id
            if request.HasField("error_detail"):
                # A NACK: the subscriber keeps its previous layer. Loud, because weights did not change there.
                log.error("%s rejected runtime %s: %s", sub.node, request.version_info, request.error_detail)
            elif request.version_info:
                sub.acked = int(request.version_info)
                async with self._acked:
                    self._acked.notify_all()
            if not request.response_nonce:
                # A first request (or a reconnect): answer with the current layer at once.
                sub.updates.put_nowait(self._response())

    async def stream(self, requests: AsyncIterator[DiscoveryRequest]) -> AsyncIterator[DiscoveryResponse]:
        sub = Subscriber(node="?")
        self._subscribers.add(sub)
        reader = asyncio.create_task(self._read(requests, sub))
        try:
            while not reader.done() or not sub.updates.empty():
                getter = asyncio.ensure_future(sub.updates.get())
                await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    break
                yield getter.result()
        finally:
            self._subscribers.discard(sub)
            reader.cancel()
            async with self._acked:
                self._acked.notify_all()


async def _chain(first: DiscoveryRequest, rest: AsyncIterator[DiscoveryRequest]) -> AsyncIterator[DiscoveryRequest]:
    yield first
    async for request in rest:
        yield request


class RuntimeDiscovery(rtds_pb2_grpc.RuntimeDiscoveryServiceServicer):  # type: ignore[misc]  # generated, untyped
    """One RTDS service; the first request's node says which hub the stream joins."""

    def __init__(self, envoys: RuntimeHub, brokers: RuntimeHub) -> None:
        self._envoys = envoys
        self._brokers = brokers

    async def StreamRuntime(  # noqa: N802  (the gRPC method name is fixed by the proto)
        self, request_iterator: AsyncIterator[DiscoveryRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[DiscoveryResponse]:
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        hub = self._brokers if first.node.cluster == wire.BROKER_NODE_CLUSTER else self._envoys
        # grpc.aio serves a stream only from an async generator function, not a returned iterator.
        async for response in hub.stream(_chain(first, request_iterator)):
            yield response


def add_runtime_service(server: grpc.aio.Server, envoys: RuntimeHub, brokers: RuntimeHub) -> None:
    rtds_pb2_grpc.add_RuntimeDiscoveryServiceServicer_to_server(RuntimeDiscovery(envoys, brokers), server)
