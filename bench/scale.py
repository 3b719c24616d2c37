"""Benchmark: the model at 8192 CPUs, whole processes, against 1 CPU in the same run.

Times `ptilab compare --cpus 8192` against `ptilab compare --cpus 1`, and
`ptilab simulate --cpus 8192 --paging 5` against its 1 s budget (with the
1-CPU simulate beside it), each as a fresh process, alternated, median of
--runs; the child's CPU time (user + system, getrusage) is printed beside
the wall clock, which other jobs on a shared machine inflate.
Targets (issue 13): compare at 8192 CPUs at most 4x compare at 1 CPU;
simulate --cpus 8192 --paging 5 at most 1 s.

    python bench/scale.py [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = {
    "compare --cpus 1": ["compare", "--cpus", "1"],
    "compare --cpus 8192": ["compare", "--cpus", "8192"],
    "simulate --cpus 1 --paging 5": ["simulate", "--cpus", "1", "--paging", "5"],
    "simulate --cpus 8192 --paging 5": ["simulate", "--cpus", "8192", "--paging", "5"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    times: dict[str, list[float]] = {row: [] for row in ROWS}
    cpu: dict[str, list[float]] = {row: [] for row in ROWS}
    for _ in range(args.runs):
        for row, argv in ROWS.items():
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "ptilab.cli", *argv], env=env, stdout=subprocess.DEVNULL,
                           check=True)
            times[row].append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[row].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    m = {row: statistics.median(t) for row, t in times.items()}
    c = {row: statistics.median(t) for row, t in cpu.items()}
    for row in ROWS:
        print(f"ptilab {row:<34}{m[row]:8.2f} s wall{c[row]:8.2f} s CPU")
    for label, t in (("wall", m), ("CPU", c)):
        ratio = t["compare --cpus 8192"] / t["compare --cpus 1"]
        sim = t["simulate --cpus 8192 --paging 5"]
        print(f"{label}: compare 8192 CPUs / 1 CPU: {ratio:.1f}x (target <= 4x: {'met' if ratio <= 4 else 'NOT met'}); "
              f"simulate --cpus 8192 --paging 5: {sim:.2f} s (target <= 1 s: {'met' if sim <= 1 else 'NOT met'})")


if __name__ == "__main__":
    main()
