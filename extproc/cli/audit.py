"""`audit show|list|init|status`: the trail read back from the configured sink and the spool on disk, as JSON."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from extproc.audit.local import LocalAuditStore
from extproc.cli.inputs import WHEN_HELP, read_registry

if TYPE_CHECKING:
    from extproc.adapters.aws_audit import AwsAuditStore
    from extproc.cli.inputs import Subcommands
    from extproc.registry import Audit, Registry

    AuditStore = AwsAuditStore | LocalAuditStore


def _audited_registry(args: argparse.Namespace) -> tuple[Registry, Audit] | int:
    """The registry and its audit section; else the exit code explaining why there is none."""
    registry = read_registry(args.config)
    if registry is None:
        return 2
    if registry.audit is None:
        print(f"{args.config}: no 'audit' section, so nothing is audited", file=sys.stderr)
        return 2
    return registry, registry.audit


def _audit_store(args: argparse.Namespace) -> AuditStore | int:
    """The registry's audit store, or the exit code explaining why there is none."""
    from extproc.adapters.audit_store import open_audit_store

    audited = _audited_registry(args)
    return audited if isinstance(audited, int) else open_audit_store(audited[1], reader=True)


def _audit_status(args: argparse.Namespace) -> int:
    """`audit status`: spool depth and age of the oldest unshipped record (from disk), ship counters (from metrics)."""
    from extproc.audit.status import broker_counters, spool_status

    audited = _audited_registry(args)
    if isinstance(audited, int):
        return audited
    registry, audit = audited
    status = spool_status(Path(audit.spool.dir), audit.spool.max_bytes, time.time())
    # None: no broker answered on metrics.port (the spool on disk is still the truth).
    status["shipping"] = broker_counters(registry.metrics.address, registry.metrics.port)
    print(json.dumps(status, indent=2))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """`audit show|list|init`: read records back from the configured sink, printing JSON."""
    from extproc.audit.record import AuditSinkUnavailable, iso_utc, parse_when

    if args.action == "status":
        return _audit_status(args)
    now = time.time()
    since = parse_when(args.since, now) if args.action == "list" else ""
    until = parse_when(args.until, now) if args.action == "list" and args.until else iso_utc(now + 1)
    if since is None or until is None:
        print(f"--since/--until: {WHEN_HELP}", file=sys.stderr)
        return 2
    store = _audit_store(args)
    if isinstance(store, int):
        return store
    try:
        if args.action == "show":
            record = store.show(args.request_id)
            if record is None:
                print(f"no audit record for request id {args.request_id}", file=sys.stderr)
                return 1
            print(json.dumps(record, indent=2))
        elif args.action == "list":
            print(json.dumps(store.by_model(args.model, since, until), indent=2))
        elif isinstance(store, LocalAuditStore):
            print("local audit sink: nothing to create")
        else:
            store.create_resources()
            print("audit bucket and table are ready")
    except AuditSinkUnavailable as exc:
        print(f"audit store unavailable: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


def add_audit(sub: Subcommands) -> None:
    """`audit` takes an action first, and each action its own `--config`, so it skips the shared `command` helper."""
    audit = sub.add_parser("audit", help="read audit records back (JSON)", description=cmd_audit.__doc__)
    actions = audit.add_subparsers(dest="action", required=True)
    show = actions.add_parser("show", help="one record by request id (the x-request-id header)")
    show.add_argument("request_id")
    listing = actions.add_parser("list", help="summaries of a model's records in a time range, oldest first")
    listing.add_argument("--model", required=True)
    listing.add_argument("--since", required=True, help="ISO date/time (UTC unless an offset is given) or age: 2h")
    listing.add_argument("--until", help="exclusive end, same forms (default: now)")
    actions.add_parser("init", help="create the S3 bucket and DynamoDB table if missing (aws sink)")
    actions.add_parser("status", help="spool depth, oldest unshipped record, ship counters (JSON)")
    for action in (show, listing, actions.choices["init"], actions.choices["status"]):
        action.add_argument("--config", "-c", required=True, help="registry YAML file")
        action.set_defaults(func=cmd_audit)
