"""The Feast configurations: the broker reading Feast's Redis online store, and `feast serve` itself.

One Feast repo per run (local provider, online store on the bench's redis-server,
project `bench`), written with the Feast SDK from its own virtualenv
(scripts/feast-venv): the same 1000 customers and four features as the own layout.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench import workload
from bench.procs import process_group
from bench.stacks import ROOT, START_TIMEOUT_S, Shared, Target, broker, starting, wait_listening
from extproc.process.launcher import free_port

DEFINITIONS = f"""
from datetime import timedelta
from feast import Entity, FeatureView, Field, FileSource
from feast.types import Float64, Int64
from feast.value_type import ValueType

customer = Entity(name="customer", join_keys=["{workload.JOIN_KEY}"], value_type=ValueType.STRING)
{workload.FEAST_VIEW} = FeatureView(
    name="{workload.FEAST_VIEW}", entities=[customer], ttl=timedelta(days=1),
    source=FileSource(path="data/{workload.FEAST_VIEW}.parquet", timestamp_field="event_timestamp"),
    schema=[
        Field(name="income", dtype=Int64), Field(name="debt_ratio", dtype=Float64),
        Field(name="tenure_months", dtype=Int64), Field(name="late_payments_12m", dtype=Int64),
    ],
)
"""


def feast_python() -> Path:
    out = subprocess.run(
        [str(ROOT / "scripts" / "feast-venv")], capture_output=True, text=True, timeout=1800, check=True
    )
    return Path(out.stdout.strip()) / "bin" / "python"


def _repo(shared: Shared) -> Path:
    """The run's Feast repo, applied and written once (the first Feast configuration makes it)."""
    repo = shared.workdir / "feast-repo"
    if (repo / "written").exists():
        return repo
    (repo / "data").mkdir(parents=True)
    redis = urlsplit(shared.redis_url)
    (repo / "feature_store.yaml").write_text(
        f"project: {workload.FEAST_PROJECT}\nregistry: data/registry.db\nprovider: local\n"
        f"online_store:\n  type: redis\n  connection_string: {redis.hostname}:{redis.port}\n"
        "entity_key_serialization_version: 3\n",
        encoding="utf-8",
    )
    (repo / "definitions.py").write_text(DEFINITIONS, encoding="utf-8")
    python = feast_python()
    now = int(time.time())
    rows = [
        {workload.JOIN_KEY: workload.customer_id(i), **workload.customer_features(i), "event_timestamp": now}
        for i in range(1, workload.CUSTOMERS + 1)
    ]
    (repo / "rows.json").write_text(json.dumps({workload.FEAST_VIEW: rows}), encoding="utf-8")
    for args in (["-m", "feast.cli.cli", "apply"], [str(ROOT / "tests" / "feast_tool.py"), "write", ".", "rows.json"]):
        subprocess.run([str(python), "-P", *args], cwd=repo, check=True, capture_output=True, timeout=600)
    (repo / "written").touch()
    return repo


def _feast_section(shared: Shared) -> dict[str, Any]:
    return {
        "redis": {"url": shared.redis_url},
        "project": workload.FEAST_PROJECT,
        "entity_key_serialization_version": 3,
        "feature_views": [{"name": workload.FEAST_VIEW, "entities": ["customer"], "ttl_seconds": 86400}],
    }


def _use_feast(shared: Shared, doc: dict[str, Any]) -> None:
    """The bench registry, reading the same features from the Feast repo instead of the own layout."""
    store = doc["feature_store"]
    doc["feature_store"] = {"feast": _feast_section(shared), "timeout_ms": store["timeout_ms"], "cache": store["cache"]}
    doc["entities"] = [{"name": "customer", "join_key": workload.JOIN_KEY, "value_type": "string"}]
    doc["models"][0]["features"] = [f"{workload.FEAST_VIEW}:{name}" for name in workload.FEATURES]


@contextlib.contextmanager
def broker_feast(shared: Shared, name: str, label: str, *, cache_ttl_s: float) -> Iterator[Target]:
    """(f) (b) with the same features read natively from Feast's Redis online store."""
    _repo(shared)
    with broker(shared, name, label, cache_ttl_s=cache_ttl_s, extend=lambda doc: _use_feast(shared, doc)) as target:
        yield target


@contextlib.contextmanager
def feast_serve(shared: Shared, name: str, label: str, *, workers: int) -> Iterator[Target]:
    """(g) `feast serve`: Feast's Python feature server answering the lookup alone (no model call)."""
    repo = _repo(shared)
    port = free_port()
    cmd = [str(feast_python()), "-P", "-m", "feast.cli.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    log = shared.workdir / f"{name}.log"
    with process_group(cmd, log, cwd=repo) as server:
        with starting(label, log):
            wait_listening([port], timeout_s=START_TIMEOUT_S * 4)  # Feast imports for seconds
        yield Target(
            name=name,
            label=label,
            url=f"http://127.0.0.1:{port}{workload.FEAST_SERVE_PATH}",
            cpu_roots={"feast": (server.pid,), "redis": (shared.redis_pid,)},
            feast_serve=True,
            logs=(log,),
        )
