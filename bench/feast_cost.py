"""`python -m bench.feast_cost`: the broker's CPU per request reading Feast's Redis vs its own layout, in-process.

The processor's body phase (parse, entity key, features through the TTL cache, policies,
inject, answer) for the same 4 features of the same 1000 customers, (b) from the own
Redis layout and (f) from Feast's online-store layout in the same redis-server, cache
on (warm: every request a hit) and off. No Envoy, no gRPC, no wrk: `time.process_time()`
of this one process, interleaved rounds, medians, so a shared box moves both rows alike.
The Feast rows are written with the broker's own codec (`tests/test_feast_codec.py` pins
it byte for byte to Feast's), so no Feast SDK is needed. `--profile f` prints a cProfile
of one configuration. Needs `redis-server`. Not a test: asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import pstats
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import redis
from google.protobuf.timestamp_pb2 import Timestamp

from bench import configs, workload
from extproc.core.context import RequestContext
from extproc.core.feast_codec import feature_field, redis_key, serialize_entity_key, timestamp_field
from extproc.core.feast_proto.Value_pb2 import Value
from extproc.core.messages import HttpBody
from extproc.core.processor import BrokerProcessor
from extproc.process.launcher import free_port
from extproc.process.worker import open_feature_store
from extproc.registry import Registry, parse_registry

CACHE_TTL_S = 600.0  # longer than a run: with the cache on, every timed request is a hit
CONFIGS = {"b": ("own layout", False, CACHE_TTL_S), "b0": ("own layout", False, 0.0)}
CONFIGS |= {"f": ("Feast", True, CACHE_TTL_S), "f0": ("Feast", True, 0.0)}


@contextlib.contextmanager
def redis_server() -> Any:
    port = free_port()
    exe = shutil.which("redis-server") or "redis-server"
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )
        try:
            client = redis.Redis(port=port)
            for _ in range(100):
                with contextlib.suppress(redis.ConnectionError):
                    client.ping()
                    break
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0", client
        finally:
            proc.terminate()
            proc.wait(10)


def seed(client: redis.Redis) -> None:
    """Both layouts of the same customers: our hashes of JSON, Feast's hashes of ValueProtos."""
    ts = Timestamp(seconds=int(time.time())).SerializeToString()
    pipe = client.pipeline(transaction=False)
    for i in range(1, workload.CUSTOMERS + 1):
        cid, values = workload.customer_id(i), workload.customer_features(i)
        pipe.hset(workload.store_key(cid), mapping={k: str(v) for k, v in values.items()})
        key = redis_key(serialize_entity_key([(workload.JOIN_KEY, "string", cid)]), workload.FEAST_PROJECT)
        fields: dict[bytes, bytes] = {timestamp_field(workload.FEAST_VIEW): ts}
        for name, value in values.items():
            proto = Value(double_val=value) if isinstance(value, float) else Value(int64_val=value)
            fields[feature_field(workload.FEAST_VIEW, name)] = proto.SerializeToString()
        pipe.hset(key, mapping=fields)  # type: ignore[arg-type]  # bytes field names are fine for Redis
    pipe.execute()


def registry(redis_url: str, *, feast: bool, cache_ttl_s: float) -> Registry:
    ports = {name: free_port() for name in ("listener", "admin", "metrics", "cp", "cpa", "broker", "http", "backend")}
    doc = configs.registry_doc(
        listener=ports["listener"],
        admin=ports["admin"],
        metrics=ports["metrics"],
        control_plane=ports["cp"],
        control_plane_admin=ports["cpa"],
        broker=ports["broker"],
        broker_http=ports["http"],
        workers=1,
        backend=ports["backend"],
        redis_url=redis_url,
        cache_ttl_s=cache_ttl_s,
    )
    if feast:  # as bench/feast.py's (f): the same features from the Feast repo's view
        store = doc["feature_store"]
        store["feast"] = {
            "redis": store.pop("redis"),
            "project": workload.FEAST_PROJECT,
            "entity_key_serialization_version": 3,
            "feature_views": [{"name": workload.FEAST_VIEW, "entities": ["customer"], "ttl_seconds": 86400}],
        }
        doc["entities"] = [{"name": "customer", "join_key": workload.JOIN_KEY, "value_type": "string"}]
        doc["models"][0]["features"] = [f"{workload.FEAST_VIEW}:{name}" for name in workload.FEATURES]
    return parse_registry(doc)


@contextlib.asynccontextmanager
async def processor(redis_url: str, *, feast: bool, cache_ttl_s: float) -> AsyncIterator[BrokerProcessor]:
    reg = registry(redis_url, feast=feast, cache_ttl_s=cache_ttl_s)
    store = open_feature_store(reg)
    try:
        yield BrokerProcessor(reg, store)
    finally:
        await store.close()


BODIES = [HttpBody(body=workload.request_body(i)) for i in range(1, workload.CUSTOMERS + 1)]


async def one_pass(proc: BrokerProcessor) -> None:
    """Every customer once; each answer checked to be the enriched body, not an error."""
    for message in BODIES:
        ctx = RequestContext(route_name=workload.MODEL, content_type=workload.JSON, request_id="r")
        answer = await proc.request_body(message, ctx)
        if getattr(answer, "status", None) is not None:
            raise SystemExit(f"the broker refused a bench request: {answer}")


async def cpu_per_request(proc: BrokerProcessor, passes: int) -> float:
    start = time.process_time()
    for _ in range(passes):
        await one_pass(proc)
    return (time.process_time() - start) / (passes * len(BODIES)) * 1e6


def profile(run: Callable[[], Awaitable[None]], loop: asyncio.AbstractEventLoop) -> None:
    prof = cProfile.Profile()
    prof.enable()
    loop.run_until_complete(run())
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


async def main(passes: int, rounds: int, only: list[str]) -> None:
    with redis_server() as (url, client):
        seed(client)
        async with contextlib.AsyncExitStack() as stack:
            procs = {}
            for key in only:
                _, feast, ttl = CONFIGS[key]
                procs[key] = await stack.enter_async_context(processor(url, feast=feast, cache_ttl_s=ttl))
                await one_pass(procs[key])  # warm-up: the cache holds every customer
            samples: dict[str, list[float]] = {key: [] for key in procs}
            for _ in range(rounds):
                for key, proc in procs.items():
                    samples[key].append(await cpu_per_request(proc, passes))
    median = {key: statistics.median(values) for key, values in samples.items()}
    # The minimum too: on a shared box other processes only ever add to a sample.
    print("| configuration | cache | broker CPU µs/request (median) | min | samples |")
    print("| --- | --- | --: | --: | --- |")
    for key, micros in median.items():
        label, _, ttl = CONFIGS[key]
        spread = ", ".join(f"{s:.0f}" for s in samples[key])
        cache = "on (warm)" if ttl else "off"
        print(f"| ({key}) {label} | {cache} | {micros:.1f} | {min(samples[key]):.1f} | {spread} |")
    for on, off in (("f", "b"), ("f0", "b0")):
        if on in median and off in median:
            print(f"({on}) / ({off}): {median[on] / median[off]:.2f}")


def profile_main(key: str, passes: int) -> None:
    _, feast, ttl = CONFIGS[key]
    with redis_server() as (url, client):
        seed(client)
        loop = asyncio.new_event_loop()
        try:
            ctx = processor(url, feast=feast, cache_ttl_s=ttl)
            proc = loop.run_until_complete(ctx.__aenter__())
            loop.run_until_complete(one_pass(proc))

            async def run() -> None:
                for _ in range(passes):
                    await one_pass(proc)

            profile(run, loop)
            loop.run_until_complete(ctx.__aexit__(None, None, None))
        finally:
            loop.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.feast_cost", description=__doc__)
    parser.add_argument("--passes", type=int, default=3, help="passes over the 1000 customers per sample")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are printed")
    parser.add_argument("--only", default="b,f,b0,f0", help="configurations: b, f (cache on), b0, f0 (cache off)")
    parser.add_argument("--profile", choices=sorted(CONFIGS), help="print a cProfile of one configuration instead")
    args = parser.parse_args()
    if args.profile:
        profile_main(args.profile, args.passes)
    else:
        asyncio.run(main(args.passes, args.rounds, args.only.split(",")))
