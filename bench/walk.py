"""Benchmark: ptilab walking both PTI views of large synthetic images (bench/large_image.py).

For each size N (GiB of RAM, all of it direct-mapped with 4 KiB pages) the
image is generated once into --dir, then a fresh child process opens it,
walks the kernel view and the user view, and reports the in-process walk
time (best of --repeat) and its peak RSS (VmHWM from /proc/self/status,
checked against getrusage(RUSAGE_CHILDREN) in the parent). Both image kinds
are timed: the ELF core (QEMU's dump-guest-memory shape) and the raw image.

Target (issue 5): at 64 GiB, both views in under 10 s and under 1 GiB peak RSS.

    python bench/walk.py [--gib 1 4 16 64] [--dir /tmp/ptilab-bench] [--repeat 3] [--profile]

--profile runs the largest size under pyinstrument (installed with pip if
missing) and prints its top lines.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

TARGET_S = 10.0
TARGET_RSS = 1 << 30


def ensure_image(directory: Path, gib: int, raw: bool) -> dict:
    from bench.large_image import write_image

    path = directory / f"pti-{gib}g.{'raw' if raw else 'elf'}"
    meta = path.with_name(path.name + ".meta.json")
    if not (path.exists() and meta.exists()):
        directory.mkdir(parents=True, exist_ok=True)
        img = write_image(path, gib, raw)
        meta.write_text(json.dumps({"kernel_cr3": img.kernel_cr3, "user_cr3": img.user_cr3,
                                    "table_pages": img.table_pages, "ptes": img.direct_map_ptes,
                                    "disk": img.file_bytes_used}))
    return {"path": str(path), **json.loads(meta.read_text())}


def vm_hwm() -> int:
    """Peak resident set of this process, bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def child(path: str, kernel_cr3: int, user_cr3: int, repeat: int) -> dict:
    """Runs in the child: open, walk both views repeat times, report."""
    from ptilab.memory.images import open_image
    from ptilab.paging import Geometry, walk

    geometry = Geometry(4)
    base_rss = vm_hwm()
    out = {"base_rss": base_rss}
    for name, cr3 in (("kernel", kernel_cr3), ("user", user_cr3)):
        best = float("inf")
        for _ in range(repeat):
            mem = open_image(path)  # a fresh mapping: first-touch page faults are part of the walk
            start = time.perf_counter()
            w = walk(mem, cr3, geometry)
            best = min(best, time.perf_counter() - start)
            ranges, tables, mapped = len(w.ranges), w.table_pages(), w.mapped_bytes()
            del w
            mem.close()
        out[name] = {"s": best, "ranges": ranges, "tables": tables, "mapped": mapped}
    out["peak_rss"] = vm_hwm()
    return out


def measure(img: dict, repeat: int) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    done = subprocess.run([sys.executable, __file__, "--child", img["path"], str(img["kernel_cr3"]),
                           str(img["user_cr3"]), str(repeat)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"child failed on {img['path']}:\n{done.stderr}")
    result = json.loads(done.stdout.splitlines()[-1])
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the largest so far: it says something only when it grew.
    result["rusage_rss"] = after * 1024 if after > before else None
    return result


def profile(img: dict) -> None:
    if importlib.util.find_spec("pyinstrument") is None:
        print("installing pyinstrument from PyPI for the profile ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "pyinstrument"], check=True)
    from pyinstrument import Profiler

    from ptilab.memory.images import open_image
    from ptilab.paging import Geometry, walk

    mem = open_image(img["path"])
    profiler = Profiler(interval=0.001)
    profiler.start()
    for cr3 in (img["kernel_cr3"], img["user_cr3"]):
        walk(mem, cr3, Geometry(4))
    profiler.stop()
    print(profiler.output_text(unicode=False, color=False, show_all=False))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ptilab-bench"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--kinds", nargs="+", default=["elf", "raw"], choices=["elf", "raw"])
    parser.add_argument("--profile", action="store_true", help="profile the largest size under pyinstrument")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, kcr3, ucr3, repeat = args.child
        print(json.dumps(child(path, int(kcr3), int(ucr3), int(repeat))))
        return 0

    print(f"ptilab walk of both PTI views, synthetic 4-level kernel; best of {args.repeat}; "
          f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}")
    head = (f"{'GiB':>4} {'kind':>4} {'tables':>7} {'PTEs':>10} {'disk MiB':>8} {'kernel s':>9} {'user s':>7} "
            f"{'both s':>7} {'us/table':>8} {'ranges':>7} {'peak RSS MiB':>12} {'(rusage)':>9}")
    print(head)
    print("-" * len(head))
    results = {}
    for gib in args.gib:
        for kind in args.kinds:
            img = ensure_image(args.dir, gib, kind == "raw")
            r = measure(img, args.repeat)
            both = r["kernel"]["s"] + r["user"]["s"]
            tables = r["kernel"]["tables"] + r["user"]["tables"]
            results[gib, kind] = (both, r["peak_rss"])
            rusage = f"{r['rusage_rss'] / 2**20:9.0f}" if r["rusage_rss"] else f"{'-':>9}"
            print(f"{gib:4d} {kind:>4} {img['table_pages']:7d} {img['ptes']:10d} {img['disk'] / 2**20:8.0f} "
                  f"{r['kernel']['s']:9.3f} {r['user']['s']:7.3f} {both:7.3f} {both / tables * 1e6:8.1f} "
                  f"{r['kernel']['ranges'] + r['user']['ranges']:7d} {r['peak_rss'] / 2**20:12.0f} {rusage}",
                  flush=True)
    print("(peak RSS includes the interpreter, numpy and the image's mapped pages; "
          f"an idle child after imports holds {r['base_rss'] / 2**20:.0f} MiB)")
    largest = max(args.gib)
    for kind in args.kinds:
        both, rss = results[largest, kind]
        ok = both < TARGET_S and rss < TARGET_RSS
        print(f"target at {largest} GiB ({kind}): both views {both:.2f} s (< {TARGET_S:.0f} s), "
              f"peak RSS {rss / 2**20:.0f} MiB (< 1024 MiB): {'met' if ok else 'MISSED'}")
    if args.profile:
        print(f"\nprofile, both views of {largest} GiB (elf):")
        profile(ensure_image(args.dir, largest, False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
