"""Timing whole processes for the benches, as a user runs them.

Each row is a command line run as a fresh Python process; the rows are run in
turn, --runs times over (alternated, so a change in the machine's load hits
every row alike), and each row's median wall clock and median CPU time (the
child's user + system time, getrusage) are kept. On a shared machine the CPU
time is the figure to read: other jobs inflate the wall clock, not it.

The children write and reuse their bytecode (``__pycache__``), as an installed
ptilab does (pip compiles it at install time, as it did volatility3's), even
where the calling shell sets PYTHONDONTWRITEBYTECODE: without that every run
would compile ptilab's sources again and time the compiler. One warm-up round
writes the bytecode and fills the page cache before the clock starts.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Timing:
    """Medians over the runs of one row, in seconds."""

    wall: float
    cpu: float


def child_env() -> dict[str, str]:
    """The environment of a timed child: this checkout's src first, bytecode cached."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def run_once(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds of one `python ARGV` run (it must exit 0; its output is dropped)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def time_rows(rows: dict[str, list[str]], runs: int) -> dict[str, Timing]:
    """Each row's `python ARGV`, alternated with the others, runs times after one warm-up round."""
    env = child_env()
    for argv in rows.values():
        run_once(argv, env)
    wall: dict[str, list[float]] = {row: [] for row in rows}
    cpu: dict[str, list[float]] = {row: [] for row in rows}
    for _ in range(runs):
        for row, argv in rows.items():
            w, c = run_once(argv, env)
            wall[row].append(w)
            cpu[row].append(c)
    return {row: Timing(statistics.median(wall[row]), statistics.median(cpu[row])) for row in rows}


def load_line() -> str:
    """The machine's load, to print beside the figures."""
    one, five, _ = os.getloadavg()
    return f"{os.cpu_count()} cores, load average {one:.2f} (1 min) {five:.2f} (5 min)"
