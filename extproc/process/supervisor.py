"""`model-broker serve` / `control-plane`: worker processes (one port each) and the
rollout control plane, each restarted if it dies.

One port per worker rather than SO_REUSEPORT: Envoy keeps only a few long-lived
HTTP/2 connections, and per-connection balancing starved workers in measurements.
On one machine the control plane runs beside the workers; on Kubernetes it is one
pod of its own (`control-plane`) and every broker pod's workers follow it
(`serve --control-plane HOST:PORT`).
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import time
from multiprocessing.process import BaseProcess
from types import FrameType

from extproc.metrics import prepare_multiprocess_dir, remove_multiprocess_dir, serve_aggregate
from extproc.process.plane import run_control_plane_process
from extproc.process.worker import DRAIN_SECONDS, run_worker
from extproc.registry import Registry

log = logging.getLogger("model_broker.supervisor")

QUICK_DEATH_SECONDS = 5.0
MAX_QUICK_DEATHS = 3


def worker_ports(registry: Registry, workers: int) -> list[int]:
    return [registry.broker.port + i for i in range(workers)]


def reachable(address: str) -> str:
    """The address to connect to a listener bound at `address` on this machine (a wildcard bind is loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address, address)


def local_control_plane(registry: Registry) -> str:
    """host:port the workers reach a control plane running beside them at (a wildcard bind is local)."""
    plane = registry.control_plane
    host = reachable(plane.address)
    return f"[{host}]:{plane.port}" if ":" in host else f"{host}:{plane.port}"


def supervise(
    config_path: str,
    registry: Registry,
    workers: int,
    control_plane: str | None = None,
    *,
    socket_dir: str | None = None,
) -> int:
    """Run until SIGTERM/SIGINT, then drain every process; returns the exit code.

    `control_plane` (host:port) names one running elsewhere; without it one runs here.
    """
    spawn = multiprocessing.get_context("spawn")
    address = registry.broker.address
    stopping = False
    plane_port = registry.control_plane.port
    follow = control_plane or local_control_plane(registry)

    def start(port: int) -> BaseProcess:
        if port == plane_port:  # the control plane is supervised like a worker, under its own port
            proc = spawn.Process(target=run_control_plane_process, args=(config_path,), name="control-plane")
        else:
            args = (config_path, address, port, workers, follow)
            proc = spawn.Process(target=run_worker, args=args, kwargs={"socket_dir": socket_dir}, name=f"broker-{port}")
        proc.start()
        return proc

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    metrics_dir = prepare_multiprocess_dir()  # before the workers start: they inherit it
    serve_aggregate(registry.metrics.address, registry.metrics.port)
    ports = worker_ports(registry, workers)
    if ports:
        log.info("broker serving ext_proc on %s ports %s", address, ", ".join(map(str, ports)))
    if control_plane is None:
        ports.insert(0, plane_port)
    procs = {port: start(port) for port in ports}
    started = {port: time.monotonic() for port in ports}
    quick_deaths = dict.fromkeys(ports, 0)
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
