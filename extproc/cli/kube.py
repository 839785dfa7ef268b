"""Kubernetes: `crds` (the CustomResourceDefinitions) and `reconcile` (Model resources → registry ConfigMap)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import TYPE_CHECKING

import uvloop

from extproc.cli.inputs import command

if TYPE_CHECKING:
    from extproc.cli.inputs import Subcommands


def cmd_crds(_args: argparse.Namespace) -> int:
    from extproc.kube.crds import render_crds

    sys.stdout.write(render_crds())
    return 0


def add_crds(sub: Subcommands) -> None:
    p = command(sub, "crds", "print the CustomResourceDefinitions generated from the registry schema", config=False)
    p.set_defaults(func=cmd_crds)


def cmd_reconcile(args: argparse.Namespace) -> int:
    """Custom resources → registry ConfigMap + statuses, until SIGTERM (needs a cluster)."""
    import yaml

    from extproc.adapters.kube import Target, in_cluster
    from extproc.kube.reconciler import reconcile_forever
    from extproc.rollout.client import AdminApi, resolve_admin

    with open(args.base, encoding="utf-8") as file:
        base = yaml.safe_load(file)
    target = Target(args.namespace, args.config_map, args.roll)
    plane = AdminApi(resolve_admin(args.admin)) if args.admin else None

    async def run() -> None:
        async with in_cluster(target) as cluster:
            await reconcile_forever(cluster, base, plane)

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(run())
    return 0


def add_reconcile(sub: Subcommands) -> None:
    p = command(sub, "reconcile", "in a cluster: Model resources → registry ConfigMap and their status", config=False)
    p.add_argument("--base", required=True, help="registry YAML with everything but the resources' entries")
    p.add_argument("--namespace", required=True, help="namespace of the resources, ConfigMap and Deployments")
    p.add_argument("--config-map", required=True, help="ConfigMap to write registry.yaml into")
    p.add_argument("--roll", action="append", default=[], help="Deployment to roll when the registry changes")
    p.add_argument(
        "--admin",
        metavar="URL",
        help="control plane admin API: weight-only changes go live there, no roll; token: $MODEL_BROKER_ADMIN_TOKEN",
    )
    p.set_defaults(func=cmd_reconcile)
