"""Start-up of the `rulebound` command: `--help`, and `runs` on the demo store.

    .venv/bin/python benchmarks/startup_bench.py [--repeat 5]

Each figure is the median wall time of `repeat` fresh processes (spawn to exit, output
discarded), run through the installed `rulebound` script next to this interpreter. The demo
store is made once in a temporary directory by `rulebound demo` (offline, scripted model).
Targets (issue 15): --help under 150 ms, runs under 300 ms.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def command() -> list[str]:
    script = Path(sys.executable).with_name("rulebound")
    return [str(script)] if script.exists() else [sys.executable, "-m", "rulebound"]


def timed(args: list[str], cwd: Path, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        subprocess.run([*command(), *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        times.append((time.perf_counter() - began) * 1000)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        subprocess.run([*command(), "demo", "--no-explain"], cwd=cwd, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for label, argv, target in (("rulebound --help", ["--help"], 150),
                                    ("rulebound runs (demo store)", ["runs"], 300)):
            timed(argv, cwd, 1)  # warm the file cache
            times = timed(argv, cwd, args.repeat)
            print(f"{label:<30} median {statistics.median(times):6.0f} ms  "
                  f"(min {min(times):.0f}, max {max(times):.0f}; target < {target} ms)",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
