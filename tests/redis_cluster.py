"""A real Redis Cluster on loopback for the tests: 3 masters + 3 replicas of Debian's redis-server.

Started with `--cluster-enabled yes` and joined by `redis-cli --cluster create`, as an
operator would; every wait is bounded in time and says what it waited for.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from extproc.process.launcher import free_port, wait_listening
from tests.conftest import Proc

MASTERS = 3
# Short enough that a failed node is noticed within the test's budget, long enough
# that a loaded CI box does not see false failures.
NODE_TIMEOUT_MS = 3000
SETTLE_TIMEOUT_S = 30.0
# A manual failover Redis gave up on is asked for again after this long.
ASK_AGAIN_S = 10.0


@dataclass(frozen=True)
class Node:
    node_id: str
    port: int
    role: str  # "master" or "slave" (Redis's word in CLUSTER NODES)
    master_id: str | None
    slots: int


class RedisClusterServers:
    """Six redis-server processes (three masters, one replica each) forming one cluster."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None or shutil.which("redis-cli") is None:
            raise RuntimeError("redis-server/redis-cli are not installed: run scripts/ensure-system-packages")
        self.workdir = workdir
        self.ports = [free_port() for _ in range(MASTERS * 2)]
        self.procs = []
        for port in self.ports:
            # The cluster bus port, chosen like the others: Redis's default (port + 10000)
            # may be taken, or past 65535 for a high free port.
            bus = free_port()
            node_dir = workdir / str(port)
            node_dir.mkdir(parents=True, exist_ok=True)
            self.procs.append(
                Proc(
                    f"redis-{port}",
                    [
                        binary,
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(node_dir / "nodes.conf"),
                        "--cluster-port",
                        str(bus),
                        "--cluster-node-timeout",
                        str(NODE_TIMEOUT_MS),
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        str(node_dir),
                    ],
                    node_dir / "redis.log",
                )
            )

    @property
    def url(self) -> str:
        """One node's URL: the client discovers the others from it."""
        return f"redis://127.0.0.1:{self.ports[0]}"

    @property
    def connection_string(self) -> str:
        """Feast's `connection_string` for the cluster: every node, comma-separated."""
        return ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def start(self) -> None:
        for proc in self.procs:
            proc.start()
        for port in self.ports:
            wait_listening(port)
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.wait_settled()

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()

    def cli(self, port: int, *args: str) -> str:
        out = subprocess.run(
            ["redis-cli", "-p", str(port), *args], check=True, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip()

    def nodes(self, port: int | None = None) -> list[Node]:
        """The cluster as one node sees it (`CLUSTER NODES`)."""
        text = self.cli(port or self.ports[0], "CLUSTER", "NODES")
        nodes = []
        for line in text.splitlines():
            parts = line.split()
            flags = parts[2].split(",")
            slots = 0
            for spec in parts[8:]:
                if spec.startswith("["):
                    continue  # a slot being migrated
                low, _, high = spec.partition("-")
                slots += int(high or low) - int(low) + 1
            nodes.append(
                Node(
                    node_id=parts[0],
                    port=int(parts[1].split("@")[0].rsplit(":", 1)[1]),
                    role="master" if "master" in flags else "slave",
                    master_id=None if parts[3] == "-" else parts[3],
                    slots=slots,
                )
            )
        return nodes

    def masters(self) -> list[Node]:
        return sorted((n for n in self.nodes() if n.role == "master" and n.slots), key=lambda n: n.port)

    def replica_of(self, master: Node) -> Node:
        return next(n for n in self.nodes() if n.master_id == master.node_id)

    def wait_settled(self, timeout_s: float = SETTLE_TIMEOUT_S) -> None:
        """Every node reports `cluster_state:ok`, knows all six, and agrees on three masters with slots."""
        deadline = time.monotonic() + timeout_s
        problem = ""
        while time.monotonic() < deadline:
            problem = self._unsettled()
            if not problem:
                return
            time.sleep(0.1)
        raise RuntimeError(f"the Redis cluster did not settle within {timeout_s:.0f}s: {problem}")

    def _unsettled(self) -> str:
        views = set()
        for port in self.ports:
            info = self.cli(port, "CLUSTER", "INFO")
            if "cluster_state:ok" not in info:
                return f"node {port}: {info.splitlines()[0]}"
            known = re.search(r"cluster_known_nodes:(\d+)", info)
            if not known or int(known.group(1)) != len(self.ports):
                return f"node {port} knows {known.group(1) if known else '?'} nodes"
            views.add(tuple(sorted((n.port, n.role, n.slots) for n in self.nodes(port))))
        if len(views) != 1:
            return "the nodes disagree on who is master"
        (view,) = views
        if sum(1 for _, role, slots in view if role == "master" and slots) != MASTERS:
            return "not three masters with slots"
        return ""

    def failover(self, replica: Node, timeout_s: float = SETTLE_TIMEOUT_S) -> float:
        """`CLUSTER FAILOVER` on a replica (the graceful, manual one); seconds until every node agrees.

        Redis drops a manual failover the replica cannot finish within its own 5 s limit
        (a loaded box, a replica still syncing); it is asked again, at most every 10 s.
        """
        start = time.monotonic()
        deadline = start + timeout_s
        asked = -ASK_AGAIN_S
        while time.monotonic() < deadline:
            if time.monotonic() - asked >= ASK_AGAIN_S:
                assert self.cli(replica.port, "CLUSTER", "FAILOVER") == "OK"
                asked = time.monotonic()
            if "role:master" in self.cli(replica.port, "INFO", "replication") and not self._unsettled():
                return time.monotonic() - start
            time.sleep(0.05)
        raise RuntimeError(f"node {replica.port} did not take over within {timeout_s:.0f}s")

    def commandstats(self, port: int) -> dict[str, int]:
        """Calls per command on one node so far, from Redis's own INFO commandstats (INFO itself left out)."""
        text = self.cli(port, "INFO", "commandstats")
        return {m[0]: int(m[1]) for m in re.findall(r"cmdstat_([\w|]+):calls=(\d+)", text) if m[0] != "info"}
