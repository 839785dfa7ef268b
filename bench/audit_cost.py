"""`python -m bench.audit_cost`: the broker's CPU per audited request and per shipped record.

Three prices the end-to-end run mixes with Envoy, the transport and a shared box:
- the record path: the processor's request body phase alone (no audit) against the
  request body + response body phases of an audited request (draft, redaction, hashes,
  one JSON encode, the spool append), on the demo registry with its embedded features;
- the shipper, per record: the segments those requests left in the spool shipped to a
  real `moto_server` on loopback by the AWS sink, phase by phase (read and parse, pack
  and compress, items, S3 PutObject, DynamoDB BatchWriteItem) and whole (`ship_segment`);
- the gRPC path: one worker-like process (its CPU from /proc) answering Envoy's messages
  from a loader process, one stream per request: the request body alone against the
  request body then the response body of an audited route (no Envoy, no shipping).
The first two are `time.process_time()` of this one process (the sink's threads
included; moto's own CPU is not). Interleaved rounds, medians. Not a test: asserts
nothing about time.

    .venv/bin/python -m bench.audit_cost [--only request|ship|grpc] [--requests 2000] [--segment 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.audit import AWS_ENV, moto_server
from bench.stacks import child_env
from extproc.adapters.aws_audit import AwsAuditStore
from extproc.audit import AuditSink, AuditTrail, Spool, ship_segment
from extproc.core.context import RequestContext
from extproc.core.features import CachedFeatureStore, EmbeddedFeatureStore
from extproc.core.messages import HttpBody
from extproc.core.processor import BrokerProcessor
from extproc.process.launcher import demo_registry_doc, free_port, wait_listening
from extproc.process.worker import audited_entities
from extproc.registry import AwsAuditSink, Registry, parse_registry

MODEL = "credit-risk"
REQUEST = HttpBody(b'{"customer_id":"c-1","amount":1200}', True)
# What the demo model answers (its features echoed), as the response body phase sees it.
ANSWER = HttpBody(
    b'{"model":"credit-risk","version":"v1","score":0.1317,"features":{"income":46500,'
    b'"debt_ratio":0.041,"tenure_months":71,"late_payments_12m":0}}',
    True,
)
BUCKET = TABLE = "bench-audit-cost"
JSON = "application/json"


def registry(spool_dir: Path) -> Registry:
    doc = demo_registry_doc(free_port())
    doc["ensembles"] = []
    # One big segment, never sealed by age: the bench rotates it itself, every `--segment` records.
    doc["audit"]["spool"] = {"dir": str(spool_dir), "max_bytes": 1 << 34, "segment_bytes": 1 << 30}
    doc["audit"]["redact"] = ["ssn", "contact.email"]
    return parse_registry(doc)


def processor(reg: Registry, trail: AuditTrail | None) -> BrokerProcessor:
    conf = reg.feature_store.embedded
    assert conf is not None
    features = EmbeddedFeatureStore.from_file(conf.path)
    store = CachedFeatureStore(features, ttl_seconds=3600, max_entries=10_000, timeout_s=1)
    return BrokerProcessor(reg, store, audit=trail)


class Requests:
    """Unique request ids, so every record is its own DynamoDB item."""

    def __init__(self) -> None:
        self.n = 0

    async def plain(self, proc: BrokerProcessor) -> None:
        self.n += 1
        ctx = RequestContext(route_name=MODEL, content_type=JSON, request_id=f"plain-{self.n}")
        await proc.request_body(REQUEST, ctx)
        proc.finish(ctx)

    async def audited(self, proc: BrokerProcessor) -> None:
        self.n += 1
        ctx = RequestContext(route_name=MODEL, content_type=JSON, request_id=f"audited-{self.n}")
        await proc.request_body(REQUEST, ctx)
        ctx.response_status, ctx.version = 200, "v1"  # from the response attributes, on the wire
        await proc.response_body(ANSWER, ctx)
        proc.finish(ctx)
        assert ctx.audit is not None
        assert ctx.audit.written


async def cpu_per_call(run: Callable[[], Any], count: int) -> float:
    start = time.process_time()
    for _ in range(count):
        await run()
    return (time.process_time() - start) / count * 1e6


def sealed_segments(spool: Spool, requests: int, per_segment: int) -> list[Path]:
    spool.rotate()
    segments = spool.take_rotated()
    Spool.seal(segments)
    paths = sorted(spool.sealed())
    assert sum(1 for _ in paths) >= requests // per_segment
    return paths


def ship_phases(store: AwsAuditStore, path: Path, segment: str) -> dict[str, float]:
    """One segment through the sink, each step timed (process CPU, all threads), in µs."""
    from extproc.adapters import aws_audit
    from extproc.audit import pack_batch, read_segment, summary

    times: dict[str, float] = {}
    t0 = time.process_time()
    records, _ = read_segment(path)
    t1 = time.process_time()
    objects = pack_batch("audit", segment, records)
    t2 = time.process_time()
    items = [aws_audit.dynamo_item(summary(r), o.locations[r["request_id"]]) for o in objects for r in o.records]
    t3 = time.process_time()
    for packed in objects:
        store._put_object(packed)  # the bench prices the sink's own calls
    t4 = time.process_time()
    for chunk in aws_audit.chunks(items, aws_audit.BATCH_LIMIT):
        store._write_items(chunk)
    t5 = time.process_time()
    times.update(read=t1 - t0, pack=t2 - t1, items=t3 - t2, s3=t4 - t3, dynamodb=t5 - t4)
    return {k: v * 1e6 / len(records) for k, v in times.items()}


def ship_whole(sink: AuditSink, paths: list[Path]) -> float:
    start, count = time.process_time(), 0
    for path in paths:
        count += ship_segment(sink, path)[1]
    return (time.process_time() - start) * 1e6 / count


def fill(spool_dir: Path, reg: Registry, requests: int, per_segment: int, name: str) -> list[Path]:
    """`requests` audited requests through the processor, rotated every `per_segment`: real records."""
    assert reg.audit is not None
    spool = Spool(spool_dir / name, max_bytes=1 << 34, segment_bytes=1 << 30)
    spool.open()
    trail = AuditTrail(
        spool, entities=audited_entities(reg), redact_paths=reg.audit.redact, registry_version="bench", fail_closed=True
    )
    proc, gen = processor(reg, trail), Requests()

    async def run() -> None:
        for i in range(requests):
            await gen.audited(proc)
            if (i + 1) % per_segment == 0:
                spool.rotate()

    asyncio.run(run())
    return sealed_segments(spool, requests, per_segment)


def median_table(title: str, samples: dict[str, list[float]]) -> None:
    print(f"\n{title}\n| step | µs CPU (median) | min | samples |\n| --- | --: | --: | --- |")
    for key, values in samples.items():
        spread = ", ".join(f"{v:.1f}" for v in values)
        print(f"| {key} | {statistics.median(values):.1f} | {min(values):.1f} | {spread} |")


def record_path(reg_dir: Path, requests: int, rounds: int) -> None:
    reg = registry(reg_dir / "spool")
    assert reg.audit is not None
    spool = Spool(reg_dir / "spool" / "record-path", max_bytes=1 << 34, segment_bytes=1 << 30)
    spool.open()
    trail = AuditTrail(
        spool, entities=audited_entities(reg), redact_paths=reg.audit.redact, registry_version="bench", fail_closed=True
    )
    plain, audited, gen = processor(reg, None), processor(reg, trail), Requests()
    samples: dict[str, list[float]] = {"request, no audit": [], "request, audited": [], "added by the audit": []}

    async def run() -> None:
        await cpu_per_call(lambda: gen.plain(plain), 500)  # warm-up: the feature cache holds c-1
        await cpu_per_call(lambda: gen.audited(audited), 500)
        for _ in range(rounds):
            a = await cpu_per_call(lambda: gen.plain(plain), requests)
            b = await cpu_per_call(lambda: gen.audited(audited), requests)
            samples["request, no audit"].append(a)
            samples["request, audited"].append(b)
            samples["added by the audit"].append(b - a)

    asyncio.run(run())
    median_table("Per request, in process (processor phases only; no gRPC, no Envoy):", samples)


def shipping(workdir: Path, requests: int, per_segment: int, rounds: int) -> None:
    reg = registry(workdir / "spool")
    os.environ.update(AWS_ENV)  # this process is the broker here: the standard chain finds moto's fake keys
    port = free_port()
    with moto_server(workdir / "moto.log", port, child_env(**AWS_ENV)) as moto:
        wait_listening(port)
        conf = AwsAuditSink(bucket=BUCKET, table=TABLE, endpoint_url=moto.url)
        store = AwsAuditStore(conf, timeout_s=5.0)
        store.create_resources()
        try:
            ship_rounds(store, workdir, reg, requests=requests, per_segment=per_segment, rounds=rounds)
        finally:
            store.close()


def ship_rounds(
    store: AwsAuditStore, workdir: Path, reg: Registry, *, requests: int, per_segment: int, rounds: int
) -> None:
    steps: dict[str, list[float]] = {}
    whole: list[float] = []
    warm = fill(workdir, reg, per_segment, per_segment, "warm")
    ship_whole(store, warm)
    for n in range(rounds):
        paths = fill(workdir, reg, requests, per_segment, f"round-{n}")
        half = len(paths) // 2
        per_step: dict[str, list[float]] = {}
        for path in paths[:half]:
            for key, micros in ship_phases(store, path, f"phases-{n}-{path.stem}").items():
                per_step.setdefault(key, []).append(micros)
        for key, values in per_step.items():
            steps.setdefault(key, []).append(statistics.mean(values))
        whole.append(ship_whole(store, paths[half:]))
    steps["sum of the steps"] = [sum(v[i] for v in steps.values()) for i in range(rounds)]
    steps["ship_segment (the shipper's call)"] = whole
    median_table(f"Per shipped record, {per_segment} records per segment, to moto_server on loopback:", steps)


def _grpc_serve(plain_port: int, audited_port: int, spool_dir: str, seconds: float) -> None:
    """Two gRPC servers in one worker-like process: the processor without a trail, and with one."""
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="bench-metrics-"))
    import grpc
    import uvloop

    from extproc.transport import add_service

    async def run() -> None:
        reg = registry(Path(spool_dir))
        assert reg.audit is not None
        spool = Spool(Path(spool_dir) / "grpc", max_bytes=1 << 34, segment_bytes=1 << 30)
        spool.open()
        trail = AuditTrail(
            spool, entities=audited_entities(reg), redact_paths=reg.audit.redact, registry_version="b", fail_closed=True
        )
        servers = []
        for port, proc in ((plain_port, processor(reg, None)), (audited_port, processor(reg, trail))):
            server = grpc.aio.server()
            add_service(server, proc)
            server.add_insecure_port(f"127.0.0.1:{port}")
            await server.start()
            servers.append(server)
        await asyncio.sleep(seconds)

    uvloop.run(run())


def _grpc_load(port: int, audited: bool, seconds: float, concurrency: int, done: Any) -> None:
    """Envoy's messages on one stream per request: the request body; then, audited, the response body."""
    import grpc
    import uvloop
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
    from envoy.service.ext_proc.v3.external_processor_pb2 import HttpBody as Body
    from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest
    from google.protobuf.struct_pb2 import Struct

    from extproc import wire

    request_attrs, response_attrs = Struct(), Struct()
    request_attrs.update({wire.ATTR_ROUTE_NAME: MODEL, wire.ATTR_REQUEST_ID: "b", wire.ATTR_CONTENT_TYPE: JSON})
    response_attrs.update({wire.ATTR_RESPONSE_CODE: 200, wire.ATTR_UPSTREAM_VERSION: "v1"})
    first = ProcessingRequest(
        request_body=Body(body=REQUEST.body, end_of_stream=True),
        attributes={wire.ATTRIBUTES_FILTER_KEY: request_attrs},
    )
    second = ProcessingRequest(
        response_body=Body(body=ANSWER.body, end_of_stream=True),
        attributes={wire.ATTRIBUTES_FILTER_KEY: response_attrs},
    )

    async def run() -> int:
        count = 0
        deadline = time.monotonic() + seconds
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ext_proc_grpc.ExternalProcessorStub(channel)

            async def one() -> None:
                call = stub.Process()
                await call.write(first)
                await call.read()
                if audited:
                    await call.write(second)
                    await call.read()
                await call.done_writing()
                await call.wait_for_connection()
                assert await call.read() is grpc.aio.EOF

            async def loop() -> None:
                nonlocal count
                while time.monotonic() < deadline:
                    await one()
                    count += 1

            await asyncio.gather(*(loop() for _ in range(concurrency)))
        return count

    done.put(uvloop.run(run()))


def grpc_path(workdir: Path, seconds: float, rounds: int) -> None:
    """One worker-like process answering Envoy's gRPC messages (a loader process plays Envoy); its CPU from /proc."""
    import multiprocessing

    from bench.procs import cpu_seconds

    spawn = multiprocessing.get_context("spawn")
    ports = free_port(), free_port()
    budget = 2 * rounds * (seconds + 5) + 30
    server = spawn.Process(target=_grpc_serve, args=(*ports, str(workdir / "grpc-spool"), budget))
    server.start()
    assert server.pid is not None
    for port in ports:
        wait_listening(port)
    samples: dict[str, list[float]] = {"gRPC, no audit (1 message)": [], "gRPC, audited (2 messages)": []}
    try:
        for n in range(rounds + 1):  # round 0 warms both up
            for values, port, audited in zip(samples.values(), ports, (False, True), strict=True):
                done = spawn.Queue()
                before = cpu_seconds((server.pid,))
                loader = spawn.Process(target=_grpc_load, args=(port, audited, 1.0 if n == 0 else seconds, 8, done))
                loader.start()
                count = done.get()
                loader.join()
                if n:
                    values.append((cpu_seconds((server.pid,)) - before) * 1e6 / count)
    finally:
        server.terminate()
        server.join()
    samples["added by the audit"] = [b - a for a, b in zip(*samples.values(), strict=False)]
    median_table("Per request, one worker process over gRPC (CPU from /proc; no Envoy, no shipping):", samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.audit_cost", description=__doc__)
    parser.add_argument("--requests", type=int, default=2000, help="requests (records) per sample")
    parser.add_argument("--segment", type=int, default=200, help="records per spool segment shipped")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are printed")
    parser.add_argument("--only", choices=("request", "ship", "grpc"), help="one of the prices")
    parser.add_argument("--seconds", type=float, default=4.0, help="gRPC load per sample")
    parser.add_argument("--profile", choices=("request", "ship"), help="print a cProfile of one instead")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="audit-cost-") as tmp:
        workdir = Path(tmp)
        jobs: dict[str, Callable[[], None]] = {
            "request": lambda: record_path(workdir, args.requests, args.rounds),
            "ship": lambda: shipping(workdir, args.requests, args.segment, args.rounds),
            "grpc": lambda: grpc_path(workdir, args.seconds, args.rounds),
        }
        if args.profile:
            prof = cProfile.Profile(time.process_time)
            prof.enable()
            jobs[args.profile]()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(30)
            return 0
        for key, job in jobs.items():
            if args.only in (None, key):
                job()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
