"""Benchmark: a full modelled boot of 8192 CPUs with 5-level paging, per design.

Each boot runs in a process of its own and reports its wall time and its
peak resident set size (getrusage ru_maxrss: what the machine had to give
the whole process, interpreter and numpy included; tracemalloc, used
before, saw only Python's allocations), after the boot and again after
walking both views. The ratios are against a baseline measured in the same
run: the same kernel booted with 1 CPU, in a process of its own too.
The walk summarises aliased subtrees: "distinct" counts the records it
walked and "aliases" the reaches that repeat one (the ESPfix area's), for
both views; "expanded" is what Walk.ranges would list before coalescing.
Target (issue 2): each design's boot under 2 s and 300 MB on a 2-core machine.

    python bench/boot.py [--cpus 8192] [--paging 5] [--kernel linux-6.1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(kernel: str, design: str, cpus: int, paging: int) -> None:
    """In the measured process: boot, walk, print what was measured as JSON."""
    sys.path.insert(0, str(ROOT / "src"))
    from ptilab.pti import boot
    from ptilab.paging import walk

    def rss() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    start = time.perf_counter()
    k = boot(kernel, design, cpus, paging)
    boot_s, boot_rss = time.perf_counter() - start, rss()
    start = time.perf_counter()
    views = [walk(k.ram, cr3, k.geometry) for cr3 in (k.user_cr3(), k.kernel_cr3())]
    print(json.dumps({"boot_s": boot_s, "boot_rss": boot_rss, "walk_s": time.perf_counter() - start,
                      "walk_rss": rss(), "distinct": sum(len(v.distinct) for v in views),
                      "aliases": sum(v.alias_count() for v in views),
                      "expanded": sum(v.expanded_records() for v in views)}))


def measured(kernel: str, design: str, cpus: int, paging: int) -> dict:
    cmd = [sys.executable, __file__, "--child", design, "--kernel", kernel, "--cpus", str(cpus),
           "--paging", str(paging)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ))
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", type=int, default=8192)
    parser.add_argument("--paging", type=int, default=5)
    parser.add_argument("--kernel", default="linux-6.1")
    parser.add_argument("--child", metavar="DESIGN", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.kernel, args.child, args.cpus, args.paging)
        return
    sys.path.insert(0, str(ROOT / "src"))
    from ptilab.pti import DESIGNS

    print(f"{args.kernel}, {args.cpus} CPUs, {args.paging}-level paging; peak RSS of the whole process")
    print(f"{'design':<12}{'boot s':>8}{'x 1-CPU':>9}{'RSS MB':>8}{'1-CPU MB':>9}{'walk s':>8}{'+walk MB':>9}"
          f"{'distinct':>9}{'aliases':>8}{'expanded':>10}  target")
    for name in DESIGNS:
        base = measured(args.kernel, name, 1, args.paging)
        m = measured(args.kernel, name, args.cpus, args.paging)
        ok = m["boot_s"] < 2 and m["boot_rss"] < 300e6
        print(f"{name:<12}{m['boot_s']:8.2f}{m['boot_s'] / base['boot_s']:9.0f}{m['boot_rss'] / 1e6:8.0f}"
              f"{base['boot_rss'] / 1e6:9.0f}{m['walk_s']:8.2f}{m['walk_rss'] / 1e6:9.0f}{m['distinct']:9d}"
              f"{m['aliases']:8d}{m['expanded']:10d}  {'met' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()
