"""One broker worker process: open the feature store, serve ext_proc on one port, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket

import grpc
import uvloop

from extproc import wire
from extproc.adapters.audit_store import open_spool
from extproc.adapters.egress import EgressClient
from extproc.adapters.feast_store import FeastFeatureStore
from extproc.adapters.redis_store import RedisFeatureStore
from extproc.audit.record import AuditTrail
from extproc.audit.shipper import Shipper
from extproc.core.features import CachedFeatureStore, EmbeddedFeatureStore, FeatureStore
from extproc.core.processor import BrokerProcessor
from extproc.core.routing import feast_views
from extproc.registry import Registry, load_registry
from extproc.registry.reload import follow_registry_file
from extproc.rollout.feedback_desk import SummaryReader
from extproc.rollout.follow import Layer, follow
from extproc.rollout.weights import apply_weights, weights_of_layer
from extproc.transport import HttpService, add_service, add_unanswered_service

log = logging.getLogger("model_broker.worker")

# A starting worker waits this long for the live weights before serving the registry's.
FIRST_WEIGHTS_SECONDS = 5.0
# In-flight streams get this long to finish after SIGTERM.
DRAIN_SECONDS = 10.0
# Then the shipper gets this long to ship the spool; what is left ships on the next start.
SHIP_ON_STOP_SECONDS = 5.0


def open_feature_store(registry: Registry) -> CachedFeatureStore:
    conf = registry.feature_store
    timeout_s = conf.timeout_ms / 1000
    store: FeatureStore
    if conf.feast is not None:
        views = feast_views(registry)
        redis = conf.feast.redis
        store = FeastFeatureStore(
            redis.url, project=conf.feast.project, views=views, timeout_s=timeout_s, cluster=redis.cluster
        )
    elif conf.redis is not None:
        store = RedisFeatureStore(conf.redis.url, timeout_s, cluster=conf.redis.cluster)
    else:
        assert conf.embedded is not None  # the registry guarantees one of the two
        store = EmbeddedFeatureStore.from_file(conf.embedded.path)
    return CachedFeatureStore(
        store, ttl_seconds=conf.cache.ttl_seconds, max_entries=conf.cache.max_entries, timeout_s=timeout_s
    )


def audited_entities(registry: Registry) -> dict[str, tuple[str, str]]:
    """Audited model → (entity name, join key), what each record names the caller by."""
    entities = {}
    for model in registry.models:
        entity = registry.entity(model.entity)
        if registry.audited(model) and entity is not None:
            entities[model.name] = (entity.name, entity.join_key)
    return entities


def open_audit(registry: Registry, port: int, workers: int) -> tuple[AuditTrail, Shipper] | None:
    """This worker's spool (its own directory and share of the bound), trail and shipper."""
    conf = registry.audit
    if conf is None:
        return None
    spool, shipper = open_spool(conf, f"worker-{port}", conf.spool.max_bytes // workers)
    trail = AuditTrail(
        spool,
        entities=audited_entities(registry),
        redact_paths=conf.redact,
        registry_version=registry.registry_version,
        fail_closed=conf.spool.when_full == "fail_closed",
    )
    return trail, shipper


async def _orphan_watch(parent: int, stop: asyncio.Event) -> None:
    """A worker whose supervisor died (even by SIGKILL) stops instead of serving on alone."""
    while not stop.is_set():
        if os.getppid() != parent:
            stop.set()
        await asyncio.sleep(1.0)


class LiveRegistry:
    """What a worker serves: the registry file's models, at the control plane's live weights.

    Both change at run time: a new runtime layer (weights) and a rewritten
    registry file (models, ensembles, entities; on Kubernetes the ConfigMap
    kubelet updates in place) are applied without a restart.
    """

    def __init__(self, registry: Registry, processor: BrokerProcessor, audit: AuditTrail | None) -> None:
        self.registry = registry
        self._processor = processor
        self._audit = audit
        self._layer: Layer = {}
        self.weights_applied = asyncio.Event()

    def apply_layer(self, layer: Layer) -> None:
        self._layer = layer
        self._use()
        self.weights_applied.set()

    async def replace(self, new: Registry) -> None:
        """Serve `new` (checked by `reload.refusal`) from the next request."""
        self.registry = new
        self._use()
        if self._audit is not None:
            self._audit.use_registry(audited_entities(new), new.registry_version)

    def _use(self) -> None:
        live = apply_weights(self.registry, weights_of_layer(self.registry, self._layer))
        self._processor.use_registry(live, declared=self.registry)


async def _wait_for_live_weights(applied: asyncio.Event, control_plane: str) -> None:
    """Serve the live split from the first request; a control plane that is away only delays the start."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(applied.wait(), FIRST_WEIGHTS_SECONDS)
    if not applied.is_set():
        log.warning(
            "no live weights from the control plane at %s within %.0f s; serving the registry's until it answers",
            control_plane,
            FIRST_WEIGHTS_SECONDS,
        )


async def serve_worker(
    config_path: str,
    registry: Registry,
    *,
    address: str,
    port: int,
    workers: int,
    control_plane: str,
    socket_dir: str | None = None,
) -> None:
    store = open_feature_store(registry)
    # One pooled session per worker for every ensemble member call (connections open on first use,
    # so it costs nothing until a reloaded registry brings the first ensemble).
    egress = EgressClient(f"http://{registry.egress.address}:{registry.egress.port}")
    audit = open_audit(registry, port, workers)
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),  # one port per worker; a second bind must fail loudly
            ("grpc.max_receive_message_length", registry.limits.max_body_bytes * 2 + 65536),
            ("grpc.http2.max_concurrent_streams", registry.broker.max_streams),
        ]
    )
    trail = audit[0] if audit else None
    summary = SummaryReader(registry.control_plane.state_file)
    processor = BrokerProcessor(registry, store, egress=egress, audit=trail, ground_truth=summary)
    live = LiveRegistry(registry, processor, trail)
    node_id = f"broker-{socket.gethostname()}-{port}"
    following = asyncio.create_task(follow(control_plane, node_id, live.apply_layer))
    reloading = asyncio.create_task(follow_registry_file(config_path, lambda: live.registry, live.replace))
    await _wait_for_live_weights(live.weights_applied, control_plane)
    index = port - registry.broker.port
    http = await _serve_http(processor, registry, address, port, socket_dir)
    add_service(server, processor)
    add_unanswered_service(server, processor)
    server.add_insecure_port(f"{address}:{port}")
    if socket_dir is not None:
        server.add_insecure_port("unix:" + _fresh_socket(wire.broker_socket(socket_dir, "grpc", index)))
    await server.start()
    log.info("worker %d serving ext_proc on %s:%d (gRPC)%s", os.getpid(), address, port, http[1])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watch = asyncio.create_task(_orphan_watch(os.getppid(), stop))
    shipping = asyncio.create_task(audit[1].run(stop)) if audit else None
    await stop.wait()
    watch.cancel()
    following.cancel()
    reloading.cancel()
    # Both transports drain at once: in-flight messages are answered, then connections close.
    await asyncio.gather(server.stop(DRAIN_SECONDS), http[0].drain(DRAIN_SECONDS) if http[0] else asyncio.sleep(0))
    await egress.close()
    await store.close()
    if audit is not None and shipping is not None:
        await shipping
        await audit[1].drain(SHIP_ON_STOP_SECONDS)


def _fresh_socket(path: str) -> str:
    """A Unix socket path to bind, freed of the file a previous run of this worker left."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return path


async def _serve_http(
    processor: BrokerProcessor, registry: Registry, address: str, port: int, socket_dir: str | None
) -> tuple[HttpService | None, str]:
    """This worker's `http_service` port (the gRPC port's offset from `http_port`) and socket, unless
    `transport: grpc`."""
    broker = registry.broker
    if broker.transport == "grpc":
        return None, ""
    index = port - broker.port
    # Envoy's JSON: base64 bodies (4/3) and the message around them.
    service = HttpService(processor, path=wire.HTTP_SERVICE_PATH, max_bytes=registry.limits.max_body_bytes * 2 + 65536)
    await service.listen_tcp(address, broker.http_port + index)
    where = f" and {address}:{broker.http_port + index} (http_service)"
    if socket_dir is not None:
        path = _fresh_socket(wire.broker_socket(socket_dir, "http", index))
        await service.listen_unix(path)
        where += f", Unix sockets in {socket_dir}"
    return service, where


def run_worker(
    config_path: str, address: str, port: int, workers: int, control_plane: str, *, socket_dir: str | None = None
) -> None:
    """Process entry point (the supervisor spawns this); `workers` sizes this worker's spool share,
    `control_plane` (host:port) is where the live weights come from, `socket_dir` where the Unix sockets go."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    registry = load_registry(config_path, envoy_files=False)
    serving = serve_worker(
        config_path,
        registry,
        address=address,
        port=port,
        workers=workers,
        control_plane=control_plane,
        socket_dir=socket_dir,
    )
    uvloop.run(serving)
