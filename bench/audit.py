"""The audit configurations' extras: moto as AWS on loopback, and the trail a run leaves behind.

An audited request's record is spooled before its response is released and
shipped afterwards, in the background. So that each run pays for its own
records (and leaves no shipping behind to load the next configuration), the
bench waits after every audited run until the spool is empty: `AuditTrail.settle`.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench.procs import process_group

# The standard credential chain, for the broker and the CLI only (never for the bench itself).
AWS_ENV: Final = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
BUCKET: Final = "bench-audit"
TABLE: Final = "bench-audit"
SETTLE_TIMEOUT_S: Final = 180.0
POLL_S: Final = 0.05


def spool_bytes(directory: Path) -> int:
    """Bytes in every worker's spool (active and sealed segments): 0 once everything is shipped."""
    total = 0
    for path in directory.rglob("*"):
        with contextlib.suppress(FileNotFoundError):  # shipped and deleted while we looked
            if path.is_file():
                total += path.stat().st_size
    return total


@dataclass(frozen=True, slots=True)
class AuditTrail:
    """Where one audited configuration spools, and how to read its records back (the project's CLI)."""

    spool_dir: Path
    registry: Path
    env: Mapping[str, str] = field(default_factory=dict)

    def settle(self, timeout_s: float = SETTLE_TIMEOUT_S) -> float:
        """Until the spool is empty (every record shipped); returns the seconds that took."""
        started = time.monotonic()
        while spool_bytes(self.spool_dir):
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(f"audit spool {self.spool_dir} not shipped after {timeout_s:.0f}s")
            time.sleep(POLL_S)
        return time.monotonic() - started

    def show(self, request_id: str) -> dict[str, Any]:
        """`model-broker audit show`: the record of one request, from the configured sink."""
        out = self.cli("show", request_id)
        record: dict[str, Any] = json.loads(out)
        return record

    def init(self) -> None:
        """`model-broker audit init`: the S3 bucket and the DynamoDB table with its index."""
        self.cli("init")

    def cli(self, *args: str) -> str:
        cmd = [sys.executable, "-m", "extproc.cli", "audit", *args, "--config", str(self.registry)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(self.env), timeout=60, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"`model-broker audit {' '.join(args)}` failed: {out.stderr.strip()[-2000:]}")
        return out.stdout


@dataclass(frozen=True, slots=True)
class Moto:
    url: str
    pid: int


@contextlib.contextmanager
def moto_server(log: Path, port: int, env: Mapping[str, str]) -> Iterator[Moto]:
    """`moto_server` (S3 + DynamoDB, in memory) on a loopback port, as the audit tests run it."""
    binary = Path(sys.executable).parent / "moto_server"
    if not binary.exists():
        raise RuntimeError(f"{binary} not found: install the test extra (`pip install -e '.[test,bench]'`)")
    cmd = [str(binary), "-H", "127.0.0.1", "-p", str(port)]
    with process_group(cmd, log, env=dict(env)) as proc:
        yield Moto(url=f"http://127.0.0.1:{port}", pid=proc.pid)
