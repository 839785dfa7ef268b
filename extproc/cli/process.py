"""Commands that run processes until stopped: `serve`, `control-plane`, `up`, `demo` and `demo-models`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from typing import TYPE_CHECKING

import uvloop

from extproc.cli.inputs import command, read_registry

if TYPE_CHECKING:
    from extproc.cli.inputs import Subcommands


def cmd_serve(args: argparse.Namespace) -> int:
    from extproc.process.supervisor import supervise

    registry = read_registry(args.config, envoy_files=False)
    if registry is None:
        return 2
    workers = args.workers or registry.broker.workers
    return supervise(args.config, registry, workers, args.control_plane, socket_dir=args.socket_dir)


def add_serve(sub: Subcommands) -> None:
    p = command(sub, "serve", "run the ext_proc server: one process per worker, one port each")
    p.add_argument("--workers", type=int, help="worker processes (default: broker.workers)")
    p.add_argument(
        "--control-plane",
        metavar="HOST:PORT",
        help="follow the rollout control plane running there instead of running one beside the workers",
    )
    p.add_argument(
        "--socket-dir",
        metavar="DIR",
        help="also listen on Unix sockets in DIR, for an Envoy on this host (envoy-config --broker-socket-dir DIR)",
    )
    p.set_defaults(func=cmd_serve)


def cmd_control_plane(args: argparse.Namespace) -> int:
    """Only the rollout control plane (its own pod on Kubernetes; `serve` runs one beside the workers)."""
    from extproc.process.supervisor import supervise

    registry = read_registry(args.config, envoy_files=False)
    if registry is None:
        return 2
    return supervise(args.config, registry, 0)


def add_control_plane(sub: Subcommands) -> None:
    p = command(sub, "control-plane", "run only the rollout control plane (live weights, rollback, shadow)")
    p.set_defaults(func=cmd_control_plane)


def cmd_up(args: argparse.Namespace) -> int:
    from extproc.process.launcher import up

    if read_registry(args.config) is None:
        return 2
    return up(args.config, args.workers)


def add_up(sub: Subcommands) -> None:
    p = command(sub, "up", "run the broker and Envoy together until Ctrl-C")
    p.add_argument("--workers", type=int, help="worker processes (default: broker.workers)")
    p.set_defaults(func=cmd_up)


def cmd_demo(args: argparse.Namespace) -> int:
    from extproc.process.launcher import demo

    return demo(args.port)


def add_demo(sub: Subcommands) -> None:
    p = command(sub, "demo", "run the bundled demo: Envoy, broker, demo models; no Redis, no AWS", config=False)
    p.add_argument("--port", type=int, default=8080, help="public listener port (default 8080)")
    p.set_defaults(func=cmd_demo)


def cmd_demo_models(args: argparse.Namespace) -> int:
    """Serve every `service` backend of a registry with the demo model (used by `demo` and tests)."""
    from extproc.demo.models import start_models

    registry = read_registry(args.config)
    if registry is None:
        return 2
    specs = [
        (m.name, v.name, v.backend.service.host, v.backend.service.port, v.backend.service.path)
        for m in registry.models
        for v in m.versions
        if v.backend.service is not None
    ]

    async def run() -> None:
        runners = await start_models(specs)
        try:
            await asyncio.Event().wait()
        finally:
            for runner in runners:
                await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(run())
    return 0


def add_demo_models(sub: Subcommands) -> None:
    p = command(sub, "demo-models", "serve the demo model on every service backend of a registry")
    p.set_defaults(func=cmd_demo_models)
