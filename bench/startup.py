"""Benchmark: start-up time of the CLI, against `python -c pass` in the same run.

Each command runs as a fresh process, alternated with the baseline, --runs
times (bench/_timing.py); medians are compared, of the wall clock and of the
child's CPU time, which other jobs on a shared machine do not inflate. Rows:
`ptilab --help` (the group and its commands' options), the imports `ptilab
dump CORE --format qemu` makes (DUMP_IMPORTS: every module the command loads
for an ELF core, tests/test_terminal.py checks it against a real run), and
click and numpy alone (the floors the CLI and the vectorised walk cannot go
under). Then -X importtime's largest cumulative imports of the dump path.
Target (issue 13): `ptilab --help` and the dump imports at most 0.1 s over
`python -c pass`, in CPU time.

    python bench/startup.py [--runs 15]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._timing import child_env, load_line, time_rows  # noqa: E402

BUDGET = 0.1
BASELINE = "python -c pass (baseline)"
DUMP_IMPORTS = ("import ptilab.cli, ptilab.memory.images, ptilab.memory.vmcoreinfo, ptilab.linux.paging_mode, "
                "ptilab.paging, ptilab.audit.checks, ptilab.formats.qemu")
ROWS = {
    BASELINE: ["-c", "pass"],
    "import click": ["-c", "import click"],
    "import numpy": ["-c", "import os; os.environ.setdefault('OPENBLAS_NUM_THREADS', '1'); import numpy"],
    "ptilab --help": ["-m", "ptilab.cli", "--help"],
    "ptilab dump: its imports": ["-c", "import os; os.environ.setdefault('OPENBLAS_NUM_THREADS', '1'); "
                                 + DUMP_IMPORTS],
}
FLOORS = ("python", "import")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    t = time_rows(ROWS, args.runs)
    base = t[BASELINE]
    print(f"median of {args.runs} alternated runs ({load_line()}); budget: +{BUDGET:.1f} s of CPU over python -c pass")
    print(f"{'command':<28}{'wall s':>8}{'over pass':>10}{'CPU s':>8}{'over pass':>10}  target (CPU)")
    for row, m in t.items():
        over = m.cpu - base.cpu
        verdict = "" if row.startswith(FLOORS) else \
            f"{over / BUDGET:.2f}x of the budget: {'met' if over <= BUDGET else 'NOT met'}"
        print(f"{row:<28}{m.wall:8.3f}{m.wall - base.wall:+10.3f}{m.cpu:8.3f}{over:+10.3f}  {verdict}")
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", DUMP_IMPORTS], env=child_env(),
                         capture_output=True, text=True, check=True).stderr
    rows = []
    for line in out.splitlines()[1:]:  # "import time: self | cumulative | name", children indented
        _, cumulative, name = line.split(":", 1)[1].split("|")
        rows.append((int(cumulative), name.rstrip()))
    print("\nlargest imports of the dump path, two levels deep (-X importtime, one run, ms cumulative):")
    for cumulative, name in sorted((r for r in rows if not r[1].startswith("    ")), reverse=True)[:12]:
        print(f"  {cumulative / 1000:7.1f}  {name[1:]}")


if __name__ == "__main__":
    main()
