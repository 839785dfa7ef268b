"""A newcomer's machine in miniature: a fresh copy of the repository, a fresh shell, a private network.

Used by `tests/test_quickstart.py` (runs the README's quick start as written) and
`bench/first_answer.py` (times it). The copy holds what a clone would (tracked and
unignored files); the shell has the user's PATH without any virtualenv and its own
runtime directory; the network namespace gives the demo its documented port 8080 and
keeps it apart from every other broker on this machine. Package installs come from a
wheel directory kept between runs (keyed by the dependencies), so `make demo` runs
exactly as written without the package index.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# Everything a fresh shell of this user would have; nothing of the test run's own environment.
KEPT_ENV = ("HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TERM", "TMPDIR", "SHELL")

# Bring up loopback inside the namespace (a new one has it down): SIOCGIFFLAGS, then SIOCSIFFLAGS with IFF_UP.
_LOOPBACK_UP = (
    "import fcntl, socket, struct\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "flags = struct.unpack('16sH', fcntl.ioctl(s, 0x8913, struct.pack('16sH22x', b'lo', 0))[:18])[1]\n"
    "fcntl.ioctl(s, 0x8914, struct.pack('16sH22x', b'lo', flags | 1))\n"
)


def copy_checkout(dest: Path) -> Path:
    """The files a clone of this checkout would have (tracked or new, never ignored), copied to `dest`."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the work tree is not in a clone of it either
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest


def wheel_dir() -> Path:
    """Wheels of the package's dependencies and build backend, downloaded once per set of requirements."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    wanted = [*project["project"]["dependencies"], *project["build-system"]["requires"]]
    tag = f"{sys.version_info.major}.{sys.version_info.minor}\n" + "\n".join(wanted)
    directory = ROOT / ".venv-wheels" / hashlib.sha256(tag.encode()).hexdigest()[:16]
    if not (directory / ".complete").exists():
        partial = directory.with_suffix(".partial")
        shutil.rmtree(partial, ignore_errors=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "-d", str(partial), *wanted],
            check=True,
            timeout=600,
        )
        (partial / ".complete").touch()
        shutil.rmtree(directory, ignore_errors=True)
        partial.rename(directory)
    return directory


def fresh_shell_env(runtime_dir: Path, wheels: Path | None) -> dict[str, str]:
    """A new login shell's environment: PATH without any virtualenv, its own runtime dir, installs from `wheels`."""
    venv_bins = {str(Path(sys.executable).parent), os.path.join(os.environ.get("VIRTUAL_ENV", "/nonexistent"), "bin")}
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p not in venv_bins]
    env = {name: os.environ[name] for name in KEPT_ENV if name in os.environ}
    env |= {"PATH": os.pathsep.join(path), "MODEL_BROKER_RUNTIME_DIR": str(runtime_dir)}
    if wheels is not None:
        env |= {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels)}
    return env


@dataclass
class Netns:
    """A private network namespace held open by a sleeping process; `run` enters it."""

    holder: subprocess.Popen[bytes]

    @property
    def enter(self) -> list[str]:
        user = [] if os.geteuid() == 0 else ["--user", "--preserve-credentials"]
        return ["nsenter", "--target", str(self.holder.pid), "--net", *user]

    def popen(self, line: str, cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        """`line` in bash inside the namespace, in its own process group, output to `log`."""
        with log.open("ab") as out:
            return subprocess.Popen(
                [*self.enter, "bash", "-c", line],
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def run(self, line: str, cwd: Path, env: dict[str, str], timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        """`line` in bash inside the namespace, to completion: exit code, stdout, stderr."""
        return subprocess.run(
            [*self.enter, "bash", "-c", line],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )


@contextlib.contextmanager
def network_namespace() -> Iterator[Netns]:
    """A new network namespace with loopback up; gone when the block ends (its holder is killed)."""
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    holder = subprocess.Popen(["unshare", *user, "--net", "--", "sleep", "infinity"])
    try:
        # Popen returns before `unshare` has made the namespace: entering it earlier would enter ours.
        deadline = time.monotonic() + 30
        while os.readlink(f"/proc/{holder.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
            if holder.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"unshare --net did not make a network namespace (exit {holder.returncode})")
            time.sleep(0.01)
        netns = Netns(holder)
        subprocess.run([*netns.enter, sys.executable, "-c", _LOOPBACK_UP], check=True, timeout=30)
        yield netns
    finally:
        holder.kill()
        holder.wait()


def stop_group(proc: subprocess.Popen[bytes], timeout_s: float = 30) -> int:
    """SIGTERM the process group `proc` leads (as Ctrl-C in its terminal would), SIGKILL if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 15)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        return proc.wait()


FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
# The README marks the samples a test compares with what the demo answers (an HTML comment: not rendered).
DEMO_OUTPUT = re.compile(r"^<!-- demo output[^>]*-->\n```console\n(.*?)^```", re.MULTILINE | re.DOTALL)


def quick_start_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each code block before the README's first `##` section: the quick start."""
    head = text.split("\n## ", 1)[0]
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(head)]


def commands(block: str) -> list[str]:
    """The shell commands of a bash block: one per line, a trailing backslash continuing it; comments dropped."""
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def quick_start_lines(text: str) -> list[str]:
    """The commands of the quick start's bash blocks after the first (`make demo`): the second terminal's."""
    return [line for language, body in quick_start_blocks(text)[1:] if language == "bash" for line in commands(body)]


def demo_output_samples(text: str) -> list[tuple[str, str]]:
    """(command, printed output) of each README console sample marked as the demo's output."""
    samples = []
    for match in DEMO_OUTPUT.finditer(text):
        command, _, output = match.group(1).partition("\n")
        assert command.startswith("$ "), command
        samples.append((command.removeprefix("$ "), output))
    return samples


def printed_commands(output: list[str]) -> list[str]:
    """The command lines `up`/`demo` printed: indented lines of the banner, not its list of routes or notes."""
    start = next(i for i, line in enumerate(output) if line.startswith("Model Broker is up at"))
    end = next(i for i, line in enumerate(output) if i > start and line.startswith("Edit "))
    routes_and_notes = ("  GET ", "  POST ", "  #")
    return [
        line.strip() for line in output[start:end] if line.startswith("  ") and not line.startswith(routes_and_notes)
    ]
