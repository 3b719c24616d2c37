"""Benchmark: formatting 65 536 ptdump lines, against a bare Python loop in the same run.

The input is tests/formats/test_ptdump.py's: 65 536 4 KiB pages, read-only
and read-write in turn, so every page is its own line (a real kernel's
ESPfix area prints as many). ptilab.formats.ptdump.format_ranges() is timed
in process CPU time, best of --repeat, beside the floor of doing it line by
line in Python: one f-string per line holding only the two addresses.
Target (issue 13, formerly a timed unit test): at most 0.5 s.

    python bench/ptdump_text.py [--lines 65536] [--repeat 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from ptilab.formats.ptdump import Marker, format_ranges  # noqa: E402
from ptilab.paging import FOUR_LEVEL  # noqa: E402
from tests.formats.test_ptdump import alternating_ranges  # noqa: E402

TARGET_S = 0.5


def best_cpu(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=65536)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    r = alternating_ranges(args.lines)
    markers = [Marker(0, "User Space"), Marker(1 << 63, "Kernel Space")]
    starts = r["va"].tolist()

    def python_loop() -> str:
        return "".join(f"0x{va:016x}-0x{va + 4096:016x}\n" for va in starts)

    ptilab = best_cpu(lambda: format_ranges(r, FOUR_LEVEL, markers), args.repeat)
    floor = best_cpu(python_loop, args.repeat)
    print(f"{args.lines} ptdump lines, best of {args.repeat}, CPU time:")
    print(f"  format_ranges()                        {ptilab:.3f} s")
    print(f"  Python loop, addresses only (floor)    {floor:.3f} s: format_ranges() takes {ptilab / floor:.2f}x")
    print(f"  target <= {TARGET_S} s: {ptilab / TARGET_S:.2f}x of it, {'met' if ptilab <= TARGET_S else 'NOT met'}")


if __name__ == "__main__":
    main()
