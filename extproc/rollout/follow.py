"""A broker worker's subscription to the control plane's live weights (RTDS, as Envoy does it).

Each worker keeps one stream to the control plane, wherever it runs (a process
beside the workers, or its own pod), applies every revision it receives and
acknowledges it; the control plane waits for these acknowledgements before a
version that had no traffic gets some, so its features are fetched from the start.
Until the first answer, and while the control plane is away, the last weights stay.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import grpc
from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse
from envoy.service.runtime.v3 import rtds_pb2_grpc
from envoy.service.runtime.v3.rtds_pb2 import Runtime
from google.protobuf.json_format import MessageToDict

from extproc import wire
from extproc.rollout.xds import RUNTIME_TYPE_URL

log = logging.getLogger("model_broker.follow")

# Between attempts while the control plane is unreachable: doubling from the first to the
# last, so a control plane that restarts beside the workers is followed again at once.
RECONNECT_SECONDS = (0.05, 2.0)
# gRPC's own reconnect back-off grows to 2 minutes by default: a control plane back after a
# restart would wait that long. A private subchannel keeps other channels' back-off out of it.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.use_local_subchannel_pool", 1),
)
# Failed attempts in a row before it is worth a warning (a few at start are normal: both are starting).
WARN_AFTER_FAILURES = 6

Layer = dict[str, object]


def subscription(node: Node) -> DiscoveryRequest:
    return DiscoveryRequest(node=node, type_url=RUNTIME_TYPE_URL, resource_names=[wire.RUNTIME_LAYER])


def acknowledgement(node: Node, response: DiscoveryResponse) -> DiscoveryRequest:
    return DiscoveryRequest(
        node=node,
        type_url=RUNTIME_TYPE_URL,
        resource_names=[wire.RUNTIME_LAYER],
        version_info=response.version_info,
        response_nonce=response.nonce,
    )


def layer_of(response: DiscoveryResponse) -> Layer | None:
    """The weights layer in one RTDS answer; None when it holds no such layer."""
    for resource in response.resources:
        runtime = Runtime()
        if resource.Unpack(runtime) and runtime.name == wire.RUNTIME_LAYER:
            layer: Layer = MessageToDict(runtime.layer)
            return layer
    return None


async def follow(target: str, node_id: str, apply: Callable[[Layer], None]) -> None:
    """Apply every layer the control plane at `target` (host:port) publishes; runs until cancelled."""
    node = Node(id=node_id, cluster=wire.BROKER_NODE_CLUSTER)
    following, failures = False, 0
    first, last = RECONNECT_SECONDS
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = rtds_pb2_grpc.RuntimeDiscoveryServiceStub(channel)
        while True:
            outbox: asyncio.Queue[DiscoveryRequest] = asyncio.Queue()
            outbox.put_nowait(subscription(node))

            async def requests(queue: asyncio.Queue[DiscoveryRequest] = outbox) -> AsyncIterator[DiscoveryRequest]:
                while True:
                    yield await queue.get()

            try:
                async for response in stub.StreamRuntime(requests()):
                    layer = layer_of(response)
                    if layer is not None:
                        apply(layer)
                    if not following:
                        log.info("following live weights from the control plane at %s", target)
                        following, failures = True, 0
                    outbox.put_nowait(acknowledgement(node, response))
            except grpc.aio.AioRpcError as exc:
                following, failures = False, failures + 1
                if failures == WARN_AFTER_FAILURES:  # once per outage, not once per retry
                    log.warning("control plane at %s unreachable (%s); keeping the current weights", target, exc.code())
            except Exception:
                # Whatever else goes wrong, a worker that stops following would serve stale weights for good.
                following, failures = False, failures + 1
                log.exception("following the control plane at %s failed; retrying", target)
            await asyncio.sleep(min(first * 2 ** min(failures, 8), last))
