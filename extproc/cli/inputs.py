"""What every command shares: its subparser, the registry read with every problem printed, time words.

A bad registry or time is the user's to fix, so each ends as a message on stderr and exit 2, not a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, TypeAlias

from extproc.registry import Registry, RegistryInvalid, load_registry

if TYPE_CHECKING:
    # Generic only to type checkers: argparse's class is not subscriptable at run time.
    Subcommands: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

WHEN_HELP = "use an ISO date or time (2026-01-31, 2026-01-31T12:00Z) or an age (15m, 2h, 7d)"


def command(sub: Subcommands, name: str, help_text: str, *, config: bool = True) -> argparse.ArgumentParser:
    """A subcommand whose help is its description; most read a registry, so `--config` is on unless declined."""
    p = sub.add_parser(name, help=help_text, description=help_text)
    if config:
        p.add_argument("--config", "-c", required=True, help="registry YAML file")
    return p


def read_registry(path: str, *, envoy_files: bool = True) -> Registry | None:
    """The registry at `path`, or None once every problem in it is printed."""
    try:
        return load_registry(path, envoy_files=envoy_files)
    except RegistryInvalid as exc:
        print(f"{path}: {len(exc.problems)} problem(s)", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return None
