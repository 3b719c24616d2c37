"""Benchmark: finding VMCOREINFO in a dump's RAM, against reading the image once.

A dump without the VMCOREINFO note (LiME, raw, QEMU without -device vmcoreinfo)
is searched for the kernel's own copy (memory.vmcoreinfo.find_vmcoreinfo): the
first words of every frame compared in numpy blocks, only candidates decoded.
Target: the search costs about what one read of the image's data costs (a
reader has to read it at least once to look at every frame); the baseline,
measured in the same run, is that read (os.pread in 16 MiB pieces over the
file's data extents, holes skipped as the search skips them), and on the LiME
dump beside it a read of every byte of the file.

Subjects:
  sparse   bench/large_image.py's synthetic PTI machine (--gib, default 64) as a
           raw image, with --data-gib of random data spread over it in 64 MiB
           pieces and --decoys pages that start with "OSRELEASE=" but are no
           VMCOREINFO; no real copy: the search reads everything (its worst case)
  lime     the pti-kaslr fixture's lime.dump (Debian 6.1, 256 MiB), whose copy
           the search finds and confirms against the tables

All warm in the page cache; runs alternate, medians printed.

    python bench/vmcoreinfo_search.py [--gib 64] [--data-gib 2] [--decoys 1000] [--runs 5] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from bench.large_image import write_image  # noqa: E402
from ptilab.memory.images import open_image  # noqa: E402
from ptilab.memory.physical import data_rows  # noqa: E402
from ptilab.memory.vmcoreinfo import find_vmcoreinfo  # noqa: E402

LIME = ROOT / "tests" / "realkernel" / "out" / "pti-kaslr" / "lime.dump"
PIECE = 64 << 20
READ = 16 << 20


def make_sparse(path: Path, gib: int, data_gib: float, decoys: int) -> None:
    """The synthetic machine's tables, random data pieces spread evenly, decoy pages inside them."""
    write_image(path, gib=gib, raw=True)
    rng = np.random.default_rng(12)
    pieces = int(data_gib * (1 << 30) // PIECE)
    stride = (gib << 30) // max(1, pieces)
    decoy = b"OSRELEASE=6.1.0\nPAGESIZE=4096\nSYMBOL(init_top_pgt)=ffffffff82a10000\nNUMBER(phys_base)=0\n"
    with open(path, "r+b") as f:
        for i in range(pieces):
            block = bytearray(rng.integers(0, 256, PIECE, dtype=np.uint8).tobytes())
            for j in range(decoys // max(1, pieces) + (i < decoys % max(1, pieces))):
                at = (j * 4099 % (PIECE // 4096)) * 4096
                block[at:at + len(decoy)] = decoy
            f.seek(i * stride + (stride // 2 & ~(PIECE - 1)))
            f.write(block)


def read_data_once(path: Path) -> int:
    """Every byte of the file's data extents, read: the floor for any reader that looks at every frame."""
    total = 0
    with open(path, "rb") as f:
        fd, size = f.fileno(), os.fstat(f.fileno()).st_size
        for lo, hi in data_rows(fd, 0, size // 4096):
            for at in range(lo * 4096, hi * 4096, READ):
                total += len(os.pread(fd, min(READ, hi * 4096 - at), at))
    return total


def read_every_byte(path: Path) -> int:
    total = 0
    with open(path, "rb") as f:
        while chunk := f.read(READ):
            total += len(chunk)
    return total


def search(path: Path) -> str:
    with open_image(path) as mem:
        found = find_vmcoreinfo(mem)
    return "none found" if found is None else found.source


def timed(fn, path: Path) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(path)
    return time.perf_counter() - t0, out


def compare(title: str, path: Path, runs: int, whole: bool) -> None:
    rows = {"search (find_vmcoreinfo)": search, "read the data once": read_data_once}
    if whole:
        rows["read every byte, holes too"] = read_every_byte
    times: dict[str, list[float]] = {name: [] for name in rows}
    said: dict[str, object] = {}
    for fn in rows.values():
        fn(path)  # warm the page cache
    for _ in range(runs):
        for name, fn in rows.items():
            t, said[name] = timed(fn, path)
            times[name].append(t)
    base = statistics.median(times["read the data once"])
    print(f"\n{title}: {path.stat().st_size / (1 << 30):.1f} GiB file, "
          f"{said['read the data once'] / (1 << 20):.0f} MiB of data; load {os.getloadavg()[0]:.2f}")
    print(f"{'':<30}{'median s':>10}{'x read':>8}  result")
    for name in rows:
        med = statistics.median(times[name])
        result = said[name] if isinstance(said[name], str) else f"{said[name] / (1 << 20):.0f} MiB"
        print(f"{name:<30}{med:>10.3f}{med / base:>8.2f}  {result}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=int, default=64)
    ap.add_argument("--data-gib", type=float, default=2.0)
    ap.add_argument("--decoys", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default="/tmp")
    args = ap.parse_args()
    path = Path(args.dir) / f"ptilab-vmcoreinfo-{args.gib}g.raw"
    try:
        make_sparse(path, args.gib, args.data_gib, args.decoys)
        compare(f"sparse synthetic machine, {args.gib} GiB, {args.decoys} decoys", path, args.runs, whole=False)
    finally:
        path.unlink(missing_ok=True)
    if LIME.exists():
        compare("real LiME dump (pti-kaslr)", LIME, args.runs, whole=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
