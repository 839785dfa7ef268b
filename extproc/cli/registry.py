"""The registry file itself: `check` (optionally against a Feast repo) and `hash-key` (its form of an API key)."""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from typing import TYPE_CHECKING

from extproc.cli.inputs import command, read_registry

if TYPE_CHECKING:
    from extproc.cli.inputs import Subcommands
    from extproc.registry import Registry


def cmd_check(args: argparse.Namespace) -> int:
    registry = read_registry(args.config)
    if registry is None:
        return 2
    if args.feast_repo and not _check_feast_repo(registry, args):
        return 2
    print(
        f"{args.config}: ok ({len(registry.models)} models, {len(registry.ensembles)} ensembles, "
        f"registry_version {registry.registry_version})"
    )
    return 0


def _check_feast_repo(registry: Registry, args: argparse.Namespace) -> bool:
    """The Feast section against the repo, described by the Feast SDK in its own environment."""
    import shutil
    import subprocess
    from pathlib import Path

    from extproc.registry import compare_feast_repo, feast_describe

    python = args.feast_python
    if python is None:
        feast = shutil.which("feast")
        python = str(Path(feast).parent / "python") if feast else None
    if python is None:
        print("check: --feast-repo needs the Feast SDK: pass --feast-python or put `feast` on PATH", file=sys.stderr)
        return False
    # -P: the script's directory must not shadow the `feast` package.
    run = subprocess.run(
        [python, "-P", feast_describe.__file__, args.feast_repo],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if run.returncode != 0:
        print(f"check: could not read the Feast repo {args.feast_repo}:\n{run.stderr[-2000:]}", file=sys.stderr)
        return False
    report = compare_feast_repo(registry, json.loads(run.stdout))
    for line in report.references:
        print(f"  {line}")
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for problem in report.problems:
        print(f"  {problem}", file=sys.stderr)
    if report.problems:
        print(f"{args.config}: {len(report.problems)} problem(s) against {args.feast_repo}", file=sys.stderr)
    return not report.problems


def add_check(sub: Subcommands) -> None:
    p = command(sub, "check", "validate a registry; exit 2 listing every problem")
    p.add_argument("--feast-repo", help="also check the feast section against this Feast repo (feature_store.yaml)")
    p.add_argument("--feast-python", help="a Python with the feast SDK (default: the one beside `feast` on PATH)")
    p.set_defaults(func=cmd_check)


def cmd_hash_key(args: argparse.Namespace) -> int:
    """Keys come from stdin, never argv: a key on the command line ends up in shell history."""
    from extproc.registry import hash_api_key

    if args.generate:
        key = secrets.token_urlsafe(32)
        print(f"key:  {key}\nhash: {hash_api_key(key)}")
        return 0
    key = sys.stdin.readline().rstrip("\r\n")
    if not key:
        print("hash-key: no key on stdin (or use --generate)", file=sys.stderr)
        return 2
    print(hash_api_key(key))
    return 0


def add_hash_key(sub: Subcommands) -> None:
    p = command(sub, "hash-key", "print the registry form (sha256:…) of an API key read from stdin", config=False)
    p.add_argument("--generate", action="store_true", help="make a new random key; print it and its hash")
    p.set_defaults(func=cmd_hash_key)
