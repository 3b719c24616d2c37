"""Benchmark: the model at 8192 CPUs, whole processes, against 1 CPU in the same run.

Times `ptilab compare --cpus 8192` against `ptilab compare --cpus 1`, and
`ptilab simulate --cpus 8192 --paging 5` against its 1 s budget (with the
1-CPU simulate beside it), each as a fresh process, alternated, median of
--runs (bench/_timing.py); the child's CPU time is printed beside the wall
clock, which other jobs on a shared machine inflate.
Targets (issue 13): compare at 8192 CPUs at most 4x compare at 1 CPU;
simulate --cpus 8192 --paging 5 at most 1 s.

    python bench/scale.py [--runs 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._timing import load_line, time_rows  # noqa: E402

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
    t = time_rows({row: ["-m", "ptilab.cli", *argv] for row, argv in ROWS.items()}, args.runs)
    print(f"median of {args.runs} alternated runs ({load_line()})")
    for row, m in t.items():
        print(f"ptilab {row:<34}{m.wall:8.2f} s wall{m.cpu:8.2f} s CPU")
    for label in ("wall", "cpu"):
        ratio = getattr(t["compare --cpus 8192"], label) / getattr(t["compare --cpus 1"], label)
        sim = getattr(t["simulate --cpus 8192 --paging 5"], label)
        print(f"{label}: compare 8192 CPUs / 1 CPU: {ratio:.1f}x (target <= 4x: {'met' if ratio <= 4 else 'NOT met'}); "
              f"simulate --cpus 8192 --paging 5: {sim:.2f} s (target <= 1 s: {'met' if sim <= 1 else 'NOT met'})")


if __name__ == "__main__":
    main()
