"""One broker worker process: open the feature store, serve ext_proc on one port, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import grpc
import uvloop

from extproc.adapters.egress import EgressClient
from extproc.adapters.redis_store import RedisFeatureStore
from extproc.features import CachedFeatureStore, EmbeddedFeatureStore, FeatureStore
from extproc.processor import BrokerProcessor
from extproc.registry import Registry, load_registry
from extproc.server import add_service

log = logging.getLogger("model_broker.worker")

# In-flight streams get this long to finish after SIGTERM.
DRAIN_SECONDS = 10.0


def open_feature_store(registry: Registry) -> CachedFeatureStore:
    conf = registry.feature_store
    timeout_s = conf.timeout_ms / 1000
    store: FeatureStore
    if conf.redis is not None:
        store = RedisFeatureStore(conf.redis.url, timeout_s)
    else:
        assert conf.embedded is not None  # the registry guarantees one of the two
        store = EmbeddedFeatureStore.from_file(conf.embedded.path)
    return CachedFeatureStore(
        store, ttl_seconds=conf.cache.ttl_seconds, max_entries=conf.cache.max_entries, timeout_s=timeout_s
    )


async def _orphan_watch(parent: int, stop: asyncio.Event) -> None:
    """A worker whose supervisor died (even by SIGKILL) stops instead of serving on alone."""
    while not stop.is_set():
        if os.getppid() != parent:
            stop.set()
        await asyncio.sleep(1.0)


async def serve_worker(registry: Registry, address: str, port: int) -> None:
    store = open_feature_store(registry)
    # One pooled session per worker for every ensemble member call; none without ensembles.
    egress = EgressClient(f"http://{registry.egress.address}:{registry.egress.port}") if registry.ensembles else None
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),  # one port per worker; a second bind must fail loudly
            ("grpc.max_receive_message_length", registry.limits.max_body_bytes * 2 + 65536),
            ("grpc.http2.max_concurrent_streams", 1024),
        ]
    )
    add_service(server, BrokerProcessor(registry, store, egress=egress))
    server.add_insecure_port(f"{address}:{port}")
    await server.start()
    log.info("worker %d serving ext_proc on %s:%d", os.getpid(), address, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watch = asyncio.create_task(_orphan_watch(os.getppid(), stop))
    await stop.wait()
    watch.cancel()
    await server.stop(DRAIN_SECONDS)
    if egress is not None:
        await egress.close()
    await store.close()


def run_worker(config_path: str, address: str, port: int) -> None:
    """Process entry point (the supervisor spawns this)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uvloop.run(serve_worker(load_registry(config_path), address, port))
