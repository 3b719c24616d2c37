"""Benchmark: a full modelled boot of 8192 CPUs with 5-level paging, per design.

Prints wall time and peak memory (tracemalloc, Python + numpy allocations, in a second run)
for the boot, and separately for walking both views; the ratios are against
a baseline measured in the same run: booting the same kernel with 1 CPU.
The walk summarises aliased subtrees: "distinct" counts the records it
walked and "aliases" the reaches that repeat one (the ESPfix area's), for
both views; "expanded" is what Walk.ranges would list before coalescing.
Target (issue 2): each design's boot under 2 s and 300 MB on a 2-core machine.

    python bench/boot.py [--cpus 8192] [--paging 5] [--kernel linux-6.1]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

from ptilab.linux.kernel import boot
from ptilab.paging import walk
from ptilab.pti import DESIGNS


def measured(fn):
    """Time one run untraced (tracemalloc slows Python several-fold), then
    run again under tracemalloc for the peak."""
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    del result
    tracemalloc.start()
    result = fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, elapsed, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", type=int, default=8192)
    parser.add_argument("--paging", type=int, default=5)
    parser.add_argument("--kernel", default="linux-6.1")
    args = parser.parse_args()
    print(f"{args.kernel}, {args.cpus} CPUs, {args.paging}-level paging")
    print(f"{'design':<12}{'boot s':>8}{'peak MB':>9}{'x 1-CPU':>9}{'walk s':>8}{'walk MB':>9}{'distinct':>9}"
          f"{'aliases':>8}{'expanded':>10}  target")
    for name in DESIGNS:
        _, base_s, _ = measured(lambda: boot(args.kernel, name, 1, args.paging))
        kernel, boot_s, boot_peak = measured(lambda: boot(args.kernel, name, args.cpus, args.paging))
        views, walk_s, walk_peak = measured(lambda: [walk(kernel.ram, cr3, kernel.geometry)
                                                     for cr3 in (kernel.user_cr3(), kernel.kernel_cr3())])
        ok = boot_s < 2 and boot_peak < 300e6
        print(f"{name:<12}{boot_s:8.2f}{boot_peak / 1e6:9.1f}{boot_s / base_s:9.0f}{walk_s:8.2f}"
              f"{walk_peak / 1e6:9.1f}{sum(len(v.distinct) for v in views):9d}{sum(v.alias_count() for v in views):8d}"
              f"{sum(v.expanded_records() for v in views):10d}  {'met' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()
