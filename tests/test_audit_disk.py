"""Nothing runs that cannot be audited, disk included: the refusal comes before the model, never a partial line.

The disk's refusal is real: a child process whose file-size limit (RLIMIT_FSIZE)
makes the kernel refuse writes past it, and a spool whose free-space floor the
filesystem cannot meet; both run unprivileged, so CI needs no mount.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import ClientOptions, demo_registry_doc, run_stack
from tests.http import call

# Runs in a child: appends records until the file-size limit refuses one mid-line, asks the
# spool whether it can write, lifts the limit, asks again, appends once more.
CHILD = """
import json, logging, resource, signal, sys, time
from pathlib import Path
from extproc.audit.disk import CHECK_SECONDS
from extproc.audit.spool import Spool
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
spool = Spool(Path(sys.argv[1]), max_bytes=1 << 30, segment_bytes=1 << 30)
spool.open()
line = b'{"record": "' + b"x" * 3000 + b'"}\\n'
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (3500, hard))  # room for one line and part of the next
appended = [spool.append(line) for _ in range(20)]
time.sleep(CHECK_SECONDS * 2)
refused_while_limited = not spool.writable()
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
time.sleep(CHECK_SECONDS * 2)
print(json.dumps({"appended": appended, "refused": refused_while_limited, "writable": spool.writable(),
                  "after": spool.append(line)}))
"""


def test_a_refused_write_leaves_no_partial_line_and_logs_once(tmp_path: Path) -> None:
    """A write refused half-way is cut back; the spool refuses until a probe passes; one log line each way."""
    directory = tmp_path / "spool"
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(directory)], capture_output=True, text=True, timeout=60, check=True
    )
    outcome = json.loads(result.stdout)
    assert outcome["appended"] == [True] + [False] * 19
    assert outcome["refused"] and outcome["writable"] and outcome["after"]
    (segment,) = directory.glob("*.open")
    lines = segment.read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(json.loads(line) for line in lines[:-1]) and len(lines) == 3
    assert len(re.findall(r"cannot take records", result.stderr)) == 1, result.stderr
    assert len(re.findall(r"writable again", result.stderr)) == 1, result.stderr


@pytest.fixture
def client_options() -> ClientOptions:
    # 30 s, the budget this module always had: each test starts its own stack and squeezes its spool's disk.
    return ClientOptions(timeout_s=30)


async def test_no_free_space_refuses_before_the_model_runs(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    """Free space under the spool's floor: 503 audit_unavailable, no model called (Envoy's counters), one log line."""
    doc = demo_registry_doc(ensembles=[])
    doc["broker"]["workers"] = 1
    doc["audit"]["spool"]["min_free_bytes"] = 1 << 50  # more than any test machine's disk has free
    with run_stack(doc, tmp_path / "stack") as stack:
        clusters = "cluster.credit-risk--v[0-9]+.upstream_rq_total"
        replies = [
            await call(session, stack.base + "/v1/models/credit-risk/predict", {"customer_id": "c-42"})
            for _ in range(10)
        ]
        assert all(r.status == 503 and r.error_code() == "audit_unavailable" for r in replies), [r.raw for r in replies]
        async with session.get(f"{stack.admin}/stats?filter=^{clusters}$") as resp:
            assert [int(n) for n in re.findall(r": (\d+)", await resp.text())] in ([], [0, 0]), "a model was called"
        log = stack.procs["broker"].log.read_text()
        assert log.count("cannot take records") == 1, log[-3000:]
        spooled = [p for p in (stack.workdir / "audit-spool").rglob("*") if p.is_file()]
        assert all(p.stat().st_size == 0 for p in spooled), spooled
