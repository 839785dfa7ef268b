"""`model-broker`: the command line, one module per part of the broker its commands drive.

`registry` (check, hash-key), `envoy` (envoy-config), `process` (serve, control-plane, up,
demo, demo-models), `audit`, `kube` (crds, reconcile), `rollout` (report, weights); `inputs`
is what they share. Each module defines its commands' arguments beside the code that reads
them and imports its heavy dependencies inside the command, so `--help` stays quick.
"""

from __future__ import annotations

import argparse
import logging

from extproc.cli import audit, envoy, kube, process, registry, rollout

__all__ = ["main", "parser"]

# The order `--help` lists them in.
_COMMANDS = (
    registry.add_check,
    envoy.add_envoy_config,
    process.add_serve,
    process.add_control_plane,
    process.add_up,
    registry.add_hash_key,
    process.add_demo,
    process.add_demo_models,
    audit.add_audit,
    kube.add_crds,
    kube.add_reconcile,
    rollout.add_report,
    rollout.add_weights,
)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="model-broker", description="ML models behind Envoy, enriched by ext_proc.")
    sub = top.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    return top


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    top = parser()
    args, extra = top.parse_known_args(argv)
    if extra and not rollout.take_weights_words(args, extra):
        top.error(f"unrecognized arguments: {' '.join(extra)}")
    code: int = args.func(args)
    return code
