"""`envoy-config`: the Envoy bootstrap from a registry, printed, or as watched xDS files in dynamic mode."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import uvloop

from extproc.cli.inputs import command, read_registry

if TYPE_CHECKING:
    from extproc.cli.inputs import Subcommands
    from extproc.envoy import Placement
    from extproc.registry import Registry


def cmd_envoy_config(args: argparse.Namespace) -> int:
    from extproc.envoy import Placement, render_yaml

    registry = read_registry(args.config)
    if registry is None:
        return 2
    registry = _settled(registry, args.envoy)
    if registry is None:
        return 2
    placement = Placement(args.broker_host, args.stats_port, args.control_plane_host, args.broker_socket_dir)
    if args.xds_dir:
        return _envoy_files(args, registry, placement)
    if args.watch:
        print("envoy-config: --watch needs --xds-dir", file=sys.stderr)
        return 2
    text = render_yaml(registry, args.workers, placement)
    if args.output:
        # For an init container: the image runs no shell to redirect with.
        with open(args.output, "w", encoding="utf-8") as file:
            file.write(text)
    else:
        sys.stdout.write(text)
    return 0


def _settled(registry: Registry, envoy: str | None) -> Registry | None:
    """The registry on the transport the Envoy in use honours (probed), or None if `http` was asked and refused."""
    from extproc.process.fast_path import FastPathClosed, settled

    try:
        return settled(registry, envoy)
    except FastPathClosed as exc:
        print(f"envoy-config: {exc}", file=sys.stderr)
        return None


def _envoy_files(args: argparse.Namespace, registry: Registry, placement: Placement) -> int:
    """Dynamic mode: bootstrap, routes and clusters files in `--xds-dir`; `--watch` keeps them current."""
    import signal

    from extproc.envoy.xds_files import dynamic_problems, render, watch, write_all
    from extproc.process.fast_path import with_transport

    problems = dynamic_problems(registry)
    if problems:
        print(f"{args.config}: {len(problems)} problem(s)", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    Path(args.xds_dir).mkdir(parents=True, exist_ok=True)
    write_all(render(registry, args.xds_dir, args.workers, placement), args.xds_dir)
    if not args.watch:
        return 0

    async def run() -> None:
        watching = asyncio.create_task(
            watch(
                args.config,
                args.xds_dir,
                registry,
                workers=args.workers,
                placement=placement,
                adjust=lambda new: with_transport(new, registry.broker.transport),
            )
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, watching.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await watching

    logging.getLogger("model_broker.envoy_files").info("watching %s for %s", args.config, args.xds_dir)
    uvloop.run(run())
    return 0


def add_envoy_config(sub: Subcommands) -> None:
    p = command(sub, "envoy-config", "print the Envoy bootstrap generated from a registry")
    p.add_argument("--workers", type=int, help="broker workers (default: broker.workers)")
    p.add_argument("--broker-host", help="DNS name Envoy resolves for the broker, e.g. a headless Service")
    p.add_argument("--stats-port", type=int, help="serve /stats/prometheus and /ready on this port")
    p.add_argument("--control-plane-host", help="DNS name of the rollout control plane, e.g. its Service")
    p.add_argument(
        "--broker-socket-dir",
        metavar="DIR",
        help="the broker shares Envoy's host: reach its workers' Unix sockets in DIR (serve --socket-dir DIR)",
    )
    p.add_argument("--output", "-o", help="write to this file instead of stdout")
    p.add_argument(
        "--envoy",
        metavar="PATH",
        help="the Envoy binary the config is for, probed for the http_service fast path (default: the pinned one)",
    )
    p.add_argument(
        "--xds-dir",
        metavar="DIR",
        help="dynamic mode: write DIR/envoy.yaml, whose routes and model clusters come from DIR/routes.yaml "
        "and DIR/clusters.yaml (watched by Envoy)",
    )
    p.add_argument(
        "--watch",
        action="store_true",
        help="with --xds-dir: keep running, rewrite the routes and clusters files when the registry changes",
    )
    p.set_defaults(func=cmd_envoy_config)
