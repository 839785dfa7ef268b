"""`model-broker`: check, envoy-config, serve, up, demo, audit, crds, reconcile, weights."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import secrets
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvloop

from extproc.audit.local import LocalAuditStore
from extproc.registry import Audit, Registry, RegistryInvalid, load_registry

if TYPE_CHECKING:
    from extproc.adapters.aws_audit import AwsAuditStore
    from extproc.envoy import Placement

    AuditStore = AwsAuditStore | LocalAuditStore


WHEN_HELP = "use an ISO date or time (2026-01-31, 2026-01-31T12:00Z) or an age (15m, 2h, 7d)"


def _load(path: str, *, envoy_files: bool = True) -> Registry | None:
    try:
        return load_registry(path, envoy_files=envoy_files)
    except RegistryInvalid as exc:
        print(f"{path}: {len(exc.problems)} problem(s)", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


def cmd_check(args: argparse.Namespace) -> int:
    registry = _load(args.config)
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

    from extproc.registry import compare_feast_repo

    python = args.feast_python
    if python is None:
        feast = shutil.which("feast")
        python = str(Path(feast).parent / "python") if feast else None
    if python is None:
        print("check: --feast-repo needs the Feast SDK: pass --feast-python or put `feast` on PATH", file=sys.stderr)
        return False
    describe = Path(__file__).parent / "registry" / "feast_describe.py"
    # -P: the script's directory must not shadow the `feast` package.
    run = subprocess.run(
        [python, "-P", str(describe), args.feast_repo], capture_output=True, text=True, timeout=300, check=False
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


def cmd_envoy_config(args: argparse.Namespace) -> int:
    from extproc.envoy import Placement, render_yaml

    registry = _load(args.config)
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
    from pathlib import Path

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


def cmd_crds(_args: argparse.Namespace) -> int:
    from extproc.kube.crds import render_crds

    sys.stdout.write(render_crds())
    return 0


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


def cmd_serve(args: argparse.Namespace) -> int:
    from extproc.process.supervisor import supervise

    registry = _load(args.config, envoy_files=False)
    if registry is None:
        return 2
    workers = args.workers or registry.broker.workers
    return supervise(args.config, registry, workers, args.control_plane, socket_dir=args.socket_dir)


def cmd_control_plane(args: argparse.Namespace) -> int:
    """Only the rollout control plane (its own pod on Kubernetes; `serve` runs one beside the workers)."""
    from extproc.process.supervisor import supervise

    registry = _load(args.config, envoy_files=False)
    if registry is None:
        return 2
    return supervise(args.config, registry, 0)


def cmd_up(args: argparse.Namespace) -> int:
    from extproc.process.launcher import up

    if _load(args.config) is None:
        return 2
    return up(args.config, args.workers)


def cmd_report(args: argparse.Namespace) -> int:
    """`report MODEL`: every release of the model in the window, from the control plane's persisted events."""
    from datetime import datetime

    from extproc.audit.record import parse_when
    from extproc.rollout.events import read_events
    from extproc.rollout.feedback_desk import read_labels
    from extproc.rollout.report import add_ground_truth, build_releases, render_json, render_markdown

    registry = _load(args.config, envoy_files=False)
    if registry is None:
        return 2
    since = None
    if args.since:
        when = parse_when(args.since, time.time())
        if when is None:
            print(
                "--since: use an ISO date or time (2026-01-31, 2026-01-31T12:00Z) or an age (15m, 2h, 7d)",
                file=sys.stderr,
            )
            return 2
        since = datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp()
    events = read_events(registry.control_plane.state_file, model=args.model, since=since)
    releases = build_releases(events, args.model)
    labels = [
        label
        for label in read_labels(registry.control_plane.state_file)
        if label.get("model") == args.model and (since is None or label.get("time", 0) >= since)
    ]
    truth = add_ground_truth(releases, labels)
    if args.format == "json":
        print(json.dumps(render_json(args.model, releases, since, truth), indent=2))
    elif args.format == "html":
        from extproc.rollout.report_html import ChartUnavailable, render_html

        try:
            print(render_html(args.model, releases, events, since, truth))
        except ChartUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    else:
        print(render_markdown(args.model, releases, since, truth))
    return 0


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


def cmd_demo(args: argparse.Namespace) -> int:
    from extproc.process.launcher import demo

    return demo(args.port)


def cmd_demo_models(args: argparse.Namespace) -> int:
    """Serve every `service` backend of a registry with the demo model (used by `demo` and tests)."""
    from extproc.demo.models import start_models

    registry = _load(args.config)
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


def cmd_weights(args: argparse.Namespace) -> int:
    from extproc.rollout.client import set_weights, show_weights

    if args.action == "show":
        return show_weights(args.admin)
    if not args.model or not args.assignments:
        print("usage: model-broker weights set MODEL VERSION=WEIGHT ...", file=sys.stderr)
        return 2
    return set_weights(args.admin, args.model, args.assignments)


def _audited_registry(args: argparse.Namespace) -> tuple[Registry, Audit] | int:
    """The registry and its audit section; else the exit code explaining why there is none."""
    registry = _load(args.config)
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


def cmd_audit_status(args: argparse.Namespace) -> int:
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
        return cmd_audit_status(args)
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


def _audit_parser(sub: Any) -> None:
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


def _check_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--feast-repo", help="also check the feast section against this Feast repo (feature_store.yaml)")
    p.add_argument("--feast-python", help="a Python with the feast SDK (default: the one beside `feast` on PATH)")
    p.set_defaults(func=cmd_check)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="model-broker", description="ML models behind Envoy, enriched by ext_proc.")
    sub = top.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str, config: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if config:
            p.add_argument("--config", "-c", required=True, help="registry YAML file")
        return p

    _check_arguments(command("check", "validate a registry; exit 2 listing every problem"))
    p = command("envoy-config", "print the Envoy bootstrap generated from a registry")
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
    p = command("serve", "run the ext_proc server: one process per worker, one port each")
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
    command("control-plane", "run only the rollout control plane (live weights, rollback, shadow)").set_defaults(
        func=cmd_control_plane
    )
    p = command("up", "run the broker and Envoy together until Ctrl-C")
    p.add_argument("--workers", type=int, help="worker processes (default: broker.workers)")
    p.set_defaults(func=cmd_up)
    p = command("hash-key", "print the registry form (sha256:…) of an API key read from stdin", config=False)
    p.add_argument("--generate", action="store_true", help="make a new random key; print it and its hash")
    p.set_defaults(func=cmd_hash_key)
    p = command("demo", "run the bundled demo: Envoy, broker, demo models; no Redis, no AWS", config=False)
    p.add_argument("--port", type=int, default=8080, help="public listener port (default 8080)")
    p.set_defaults(func=cmd_demo)
    command("demo-models", "serve the demo model on every service backend of a registry").set_defaults(
        func=cmd_demo_models
    )
    _audit_parser(sub)
    command(
        "crds", "print the CustomResourceDefinitions generated from the registry schema", config=False
    ).set_defaults(func=cmd_crds)
    p = command("reconcile", "in a cluster: Model resources → registry ConfigMap and their status", config=False)
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
    _add_report(command("report", "every release and rollback of a model: steps, traffic share, errors, p95"))
    p = command("weights", "show or change live traffic weights on every Envoy (no restart)", config=False)
    p.add_argument("action", choices=["show", "set"])
    p.add_argument("model", nargs="?", help="model name (set)")
    p.add_argument("assignments", nargs="*", metavar="VERSION=WEIGHT", help="a weight for every version (set)")
    p.add_argument(
        "--admin", help="admin API URL (default: the broker `up`/`demo` started here); token: $MODEL_BROKER_ADMIN_TOKEN"
    )
    p.set_defaults(func=cmd_weights)
    return top


def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("model")
    p.add_argument("--since", help="ISO date/time (UTC unless an offset is given) or age: 2h (default: all)")
    p.add_argument("--format", choices=["md", "json", "html"], default="md")
    p.set_defaults(func=cmd_report)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    top = parser()
    args, extra = top.parse_known_args(argv)
    if extra and args.func is cmd_weights and not any(word.startswith("-") for word in extra):
        # argparse fills positionals before the first option: `weights set --admin URL m v1=1`
        # leaves the model and split over. Take them in the order given.
        words = [word for word in (args.model, *args.assignments) if word] + extra
        args.model, args.assignments = words[0], words[1:]
    elif extra:
        top.error(f"unrecognized arguments: {' '.join(extra)}")
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
