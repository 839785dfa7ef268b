"""A newcomer's first minute: seconds from `make demo` in a fresh copy to the first enriched answer.

    .venv/bin/python -m bench.first_answer [--rounds 3] [--index]

Each round copies this checkout as a clone would have it, opens a shell without the
venv and with its own runtime directory in a private network namespace (so the demo
gets its documented port 8080), runs `make demo` and sends the README's first curl
every 0.2 s until it answers 200 with the injected features. By default packages come
from the wheel directory the quick-start test keeps (a warm package cache: pip here
cannot cache, the index's answers carry no cache headers); `--index` asks the package
index as a first-time user would. Not a test: prints the figures and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from tests import quickstart


def first_answer(rounds_dir: Path, wheels: Path | None) -> tuple[float, float]:
    """(seconds to the banner, seconds to the first enriched answer) of one fresh `make demo`."""
    clone = quickstart.copy_checkout(rounds_dir / "model-broker")
    env = quickstart.fresh_shell_env(rounds_dir / "runtime", wheels)
    readme = quickstart.README.read_text(encoding="utf-8")
    curl = next(line for line in quickstart.quick_start_lines(readme) if line.startswith("curl "))
    log = rounds_dir / "make-demo.log"
    with quickstart.network_namespace() as netns:
        start = time.monotonic()
        demo = netns.popen("make demo", clone, env, log)
        try:
            banner = 0.0
            while True:
                if demo.poll() is not None:
                    raise RuntimeError(f"make demo exited with {demo.returncode}:\n{log.read_text()}")
                if not banner and "Model Broker is up at" in log.read_text(errors="replace"):
                    banner = time.monotonic() - start
                done = netns.run(curl.replace(" -i ", " "), clone, env, timeout_s=10)
                if done.returncode == 0 and done.stdout.startswith("{") and json.loads(done.stdout).get("features"):
                    answered = time.monotonic() - start
                    return banner or answered, answered  # the banner came out during this last try
                time.sleep(0.2)
        finally:
            quickstart.stop_group(demo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--index", action="store_true", help="install from the package index, not the wheel directory")
    args = parser.parse_args()
    figures = []
    for i in range(args.rounds):
        wheels = None if args.index else quickstart.wheel_dir()  # downloads once per set of requirements
        load = os.getloadavg()
        with tempfile.TemporaryDirectory(prefix="first-answer-") as work:
            banner, answer = first_answer(Path(work), wheels)
        figures.append(answer)
        print(
            f"round {i + 1}: banner after {banner:.1f} s, first enriched answer after {answer:.1f} s "
            f"(load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})",
            flush=True,
        )
    source = "the package index" if args.index else "a warm wheel directory"
    print(f"median of {len(figures)}: {statistics.median(figures):.1f} s ({source}; {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
