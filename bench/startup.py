"""Benchmark: start-up time of the CLI, against `python -c pass` in the same run.

Each command runs as a fresh process, alternated with the baseline, --runs
times; medians are compared, of the wall clock and of the child's CPU time
(user + system, getrusage), which other jobs on a shared machine do not inflate. Rows: `ptilab --help` (the group and its
commands' options), the imports `ptilab dump --format qemu` needs before it
reads a byte (the CLI, the walker, the image readers, the QEMU formatter),
and click alone (the floor the CLI cannot go under). Then -X importtime's
largest cumulative imports of the dump path, to say where the time goes.
Target (issue 13): `ptilab --help` and the dump imports at most 0.1 s over
`python -c pass`.

    python bench/startup.py [--runs 15]
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
BUDGET = 0.1
DUMP_IMPORTS = "import ptilab.cli, ptilab.paging, ptilab.memory.images, ptilab.formats.qemu"
ROWS = {
    "python -c pass (baseline)": ["-c", "pass"],
    "import click": ["-c", "import click"],
    "ptilab --help": ["-m", "ptilab.cli", "--help"],
    "ptilab dump: its imports": ["-c", DUMP_IMPORTS],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    times: dict[str, list[float]] = {row: [] for row in ROWS}
    cpu: dict[str, list[float]] = {row: [] for row in ROWS}
    for _ in range(args.runs):
        for row, argv in ROWS.items():
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run([sys.executable, *argv], env=env, stdout=subprocess.DEVNULL, check=True)
            times[row].append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[row].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    base = statistics.median(times["python -c pass (baseline)"])
    base_cpu = statistics.median(cpu["python -c pass (baseline)"])
    print(f"median of {args.runs} alternated runs; budget: +{BUDGET:.1f} s over python -c pass")
    print(f"{'command':<30}{'wall s':>8}{'over pass':>10}{'CPU s':>8}{'over pass':>10}  target (on CPU time)")
    for row in ROWS:
        m, c = statistics.median(times[row]), statistics.median(cpu[row])
        verdict = "" if row.startswith(("python", "import click")) else \
            ("met" if c - base_cpu <= BUDGET else "NOT met")
        print(f"{row:<30}{m:8.3f}{m - base:+10.3f}{c:8.3f}{c - base_cpu:+10.3f}  {verdict}")
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", DUMP_IMPORTS], env=env, capture_output=True,
                         text=True, check=True).stderr
    rows = []
    for line in out.splitlines()[1:]:  # "import time: self | cumulative | name", children indented
        _, cumulative, name = line.split(":", 1)[1].split("|")
        rows.append((int(cumulative), name.rstrip()))
    print("\nlargest top-level imports of the dump path (-X importtime, one run, ms cumulative):")
    for cumulative, name in sorted((r for r in rows if not r[1].startswith("  ")), reverse=True)[:8]:
        print(f"  {cumulative / 1000:7.1f}  {name.strip()}")


if __name__ == "__main__":
    main()
