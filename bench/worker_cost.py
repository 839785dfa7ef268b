"""CPU per request of one broker worker, per transport, without Envoy: the Python cost alone.

Starts one worker process (the real processor, embedded demo features, cache warm)
serving both transports, loads it with the messages Envoy would send (a buffered
body for `credit-risk`), and divides the worker's CPU time (/proc) by the requests
answered. http_service is loaded by `wrk` (keep-alive, like Envoy's pool); gRPC by a
grpc.aio client in its own process (one stream per request, like Envoy). Not a
test; on a busy box the figures include contention.

    .venv/bin/python -m bench.worker_cost [--seconds 6] [--connections 8]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.procs import cpu_seconds

BODY = b'{"customer_id":"c-1","amount":1200}'
ATTRIBUTES = {
    "envoy.filters.http.ext_proc": {
        "xds.route_name": "credit-risk",
        "request.id": "bench-1",
        "request.headers['content-type']": "application/json",
    }
}


def _serve(grpc_port: int, http_port: int, seconds: float) -> None:
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="bench-metrics-"))
    import grpc
    import uvloop

    from extproc.core.features import CachedFeatureStore, EmbeddedFeatureStore
    from extproc.core.processor import BrokerProcessor
    from extproc.process.launcher import demo_registry_doc
    from extproc.registry import parse_registry
    from extproc.transport import HttpService, add_service

    async def main() -> None:
        registry = parse_registry(demo_registry_doc(8080))
        store_conf = registry.feature_store.embedded
        assert store_conf is not None
        store = CachedFeatureStore(
            EmbeddedFeatureStore.from_file(store_conf.path), ttl_seconds=3600, max_entries=10_000, timeout_s=1
        )
        registry_no_ensembles = registry.model_copy(update={"ensembles": []})
        processor = BrokerProcessor(registry_no_ensembles, store)
        http = HttpService(processor, path="/ext_proc", max_bytes=1 << 20)
        await http.listen_tcp("127.0.0.1", http_port)
        server = grpc.aio.server()
        add_service(server, processor)
        server.add_insecure_port(f"127.0.0.1:{grpc_port}")
        await server.start()
        await asyncio.sleep(seconds)

    uvloop.run(main())


def _grpc_load(port: int, seconds: float, concurrency: int, done: multiprocessing.Queue[int]) -> None:
    import grpc
    import uvloop
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
    from envoy.service.ext_proc.v3.external_processor_pb2 import HttpBody, ProcessingRequest
    from google.protobuf.struct_pb2 import Struct

    attrs = Struct()
    attrs.update(ATTRIBUTES["envoy.filters.http.ext_proc"])
    message = ProcessingRequest(
        request_body=HttpBody(body=BODY, end_of_stream=True), attributes={"envoy.filters.http.ext_proc": attrs}
    )

    async def main() -> int:
        count = 0
        deadline = time.monotonic() + seconds
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ext_proc_grpc.ExternalProcessorStub(channel)

            async def loop() -> None:
                nonlocal count
                while time.monotonic() < deadline:
                    async for _ in stub.Process(iter([message])):
                        pass
                    count += 1

            await asyncio.gather(*(loop() for _ in range(concurrency)))
        return count

    done.put(uvloop.run(main()))


def _wrk_script(path: Path) -> None:
    message = {
        "request_body": {"body": base64.b64encode(BODY).decode(), "end_of_stream": True},
        "metadata_context": {},
        "attributes": ATTRIBUTES,
        "protocol_config": {"request_body_mode": "BUFFERED"},
    }
    body = json.dumps(message).replace("\\", "\\\\").replace("'", "\\'")
    path.write_text(
        f"wrk.method = 'POST'\nwrk.body = '{body}'\nwrk.headers['Content-Type'] = 'application/json'\n",
        encoding="utf-8",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.worker_cost", description=__doc__)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args(argv)
    from extproc.process.launcher import free_port, wait_listening

    grpc_port, http_port = free_port(), free_port()
    spawn = multiprocessing.get_context("spawn")
    worker = spawn.Process(target=_serve, args=(grpc_port, http_port, 3 * args.seconds + 30))
    worker.start()
    assert worker.pid is not None
    wait_listening(grpc_port)
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        _wrk_script(script)
        url = f"http://127.0.0.1:{http_port}/ext_proc"
        subprocess.run(["wrk", "-t1", "-c8", "-d1s", "-s", str(script), url], capture_output=True, check=True)
        before = cpu_seconds((worker.pid,))
        out = subprocess.run(
            ["wrk", "-t1", f"-c{args.connections}", f"-d{args.seconds:g}s", "-s", str(script), url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        http_cpu = cpu_seconds((worker.pid,)) - before
    http_requests = int(next(line for line in out.splitlines() if "requests in" in line).split()[0])
    done: multiprocessing.Queue[int] = spawn.Queue()
    before = cpu_seconds((worker.pid,))
    loader = spawn.Process(target=_grpc_load, args=(grpc_port, args.seconds, args.connections, done))
    loader.start()
    grpc_requests = done.get()
    loader.join()
    grpc_cpu = cpu_seconds((worker.pid,)) - before
    worker.terminate()
    worker.join()
    load = os.getloadavg()[0]
    print(f"one worker, {args.connections} concurrent, {args.seconds:g} s each; load average {load:.1f}")
    print(f"http_service: {http_requests / args.seconds:8,.0f} req/s  {http_cpu * 1e6 / http_requests:6.1f} µs CPU/req")
    print(f"gRPC        : {grpc_requests / args.seconds:8,.0f} req/s  {grpc_cpu * 1e6 / grpc_requests:6.1f} µs CPU/req")
    return 0


if __name__ == "__main__":
    sys.exit(main())
