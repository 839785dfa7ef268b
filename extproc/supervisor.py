"""`model-broker serve`: N worker processes, one port each, restarted if one dies.

One port per worker rather than SO_REUSEPORT: Envoy keeps only a few long-lived
HTTP/2 connections, and per-connection balancing starved workers in measurements.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import time
from multiprocessing.process import BaseProcess
from types import FrameType

from extproc.metrics import prepare_multiprocess_dir, remove_multiprocess_dir, serve_aggregate
from extproc.registry import Registry
from extproc.worker import DRAIN_SECONDS, run_worker

log = logging.getLogger("model_broker.supervisor")

QUICK_DEATH_SECONDS = 5.0
MAX_QUICK_DEATHS = 3


def worker_ports(registry: Registry, workers: int) -> list[int]:
    return [registry.broker.port + i for i in range(workers)]


def supervise(config_path: str, registry: Registry, workers: int) -> int:
    """Run until SIGTERM/SIGINT, then drain every worker; returns the exit code."""
    spawn = multiprocessing.get_context("spawn")
    address = registry.broker.address
    ports = worker_ports(registry, workers)
    stopping = False

    def start(port: int) -> BaseProcess:
        proc = spawn.Process(target=run_worker, args=(config_path, address, port, workers), name=f"broker-{port}")
        proc.start()
        return proc

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    metrics_dir = prepare_multiprocess_dir()  # before the workers start: they inherit it
    serve_aggregate(registry.metrics.address, registry.metrics.port)
    procs = {port: start(port) for port in ports}
    started = {port: time.monotonic() for port in ports}
    quick_deaths = dict.fromkeys(ports, 0)
    log.info("broker serving ext_proc on %s ports %s", address, ", ".join(map(str, ports)))
    code = 0
    while not stopping:
        time.sleep(0.2)
        for port, proc in procs.items():
            if proc.is_alive() or stopping:
                continue
            lived = time.monotonic() - started[port]
            quick_deaths[port] = quick_deaths[port] + 1 if lived < QUICK_DEATH_SECONDS else 0
            if quick_deaths[port] >= MAX_QUICK_DEATHS:
                # A worker that cannot even start (port taken, bad config) will not heal by retrying.
                log.error("worker on port %d keeps exiting (last code %s); stopping", port, proc.exitcode)
                stopping, code = True, 1
                break
            log.warning("worker on port %d exited with %s; restarting", port, proc.exitcode)
            procs[port], started[port] = start(port), time.monotonic()
    for proc in procs.values():
        if proc.pid is not None and proc.is_alive():
            proc.terminate()  # SIGTERM: the worker drains in-flight streams
    deadline = time.monotonic() + DRAIN_SECONDS + 2
    for proc in procs.values():
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
    remove_multiprocess_dir(metrics_dir)
    return code
