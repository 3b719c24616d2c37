"""The same memory audited from each dump format, side by side in one run.

Target (issue 12): auditing a kdump-compressed dump takes at most 2x the time
and the peak memory of auditing the same memory as an ELF core. Every audit
runs in a fresh process (``python -m ptilab.cli audit --json``), best of
--repeat runs; peak memory is the child's ru_maxrss.

Two subjects:
  real     the pti-kaslr fixture (Debian 6.1, 256 MiB guest): core.elf, QEMU's
           kdump-zlib.dump (flattened), makedumpfile's -c and -l dumps, LiME's
           lime.dump; all audited from init_mm's PGD (VMCOREINFO's init_top_pgt)
  large    bench/large_image.py's synthetic N GiB PTI machine (a direct map in
           4 KiB pages: thousands of table frames to decompress), as an ELF core
           and as kdump files (zlib, lzo, and flattened zlib) holding its frames

    python bench/dump_formats.py [--gib 8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from bench.large_image import write_image  # noqa: E402
from ptilab.memory.elfcore import ElfCore  # noqa: E402
from tests.memory.dumpfiles import write_kdump  # noqa: E402

FIXTURE = ROOT / "tests" / "realkernel" / "out" / "pti-kaslr"
TARGET = 2.0


def audit(path: Path, cr3: int, repeat: int) -> tuple[float, float]:
    """Best wall time (s) and peak RSS (MiB) of `ptilab audit --json` over repeat runs."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}")
    best_t, best_rss = float("inf"), float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "ptilab.cli", "audit", "--json", str(path), "--cr3", f"{cr3:x}"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        elapsed = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        if code not in (0, 1):
            raise SystemExit(f"audit of {path} failed with exit {code}: {child.stderr.read().decode().strip()}")
        best_t, best_rss = min(best_t, elapsed), min(best_rss, usage.ru_maxrss / 1024)
    return best_t, best_rss


def compare(title: str, files: dict[str, Path], cr3: int, repeat: int) -> bool:
    print(f"\n{title}")
    print(f"{'format':<28}{'file MiB':>10}{'audit s':>9}{'peak MiB':>10}{'time x':>8}{'mem x':>7}")
    base_t = base_m = None
    ok = True
    for name, path in files.items():
        t, m = audit(path, cr3, repeat)
        if base_t is None:
            base_t, base_m = t, m
        rt, rm = t / base_t, m / base_m
        kdump = path.suffix == ".dump" and "lime" not in name
        verdict = "" if not kdump else ("  ok" if rt <= TARGET and rm <= TARGET else "  OVER TARGET")
        ok &= not verdict.strip().startswith("OVER")
        print(f"{name:<28}{path.stat().st_blocks * 512 / 2**20:>10.1f}{t:>9.2f}{m:>10.0f}{rt:>8.2f}{rm:>7.2f}{verdict}")
    return ok


def real(repeat: int) -> bool:
    if not (FIXTURE / "lime.dump").exists():
        print(f"no {FIXTURE}/lime.dump: run python tests/realkernel/build.py --config pti-kaslr")
        return False
    with ElfCore(FIXTURE / "core.elf") as core:  # reads the notes only: a few pages
        cr3 = core.vmcoreinfo.kernel_pgd
    names = ["core.elf", "kdump-zlib.dump", "makedumpfile-zlib.dump", "makedumpfile-lzo.dump", "lime.dump"]
    return compare("real: Debian 6.1 pti-kaslr, 256 MiB guest, init_mm's PGD pair",
                   {n: FIXTURE / n for n in names}, cr3, repeat)


def prepare_large(out: Path, gib: int) -> int:
    """Write the synthetic machine as an ELF core and as kdump files in out;
    returns the kernel CR3. Run in a child process: the frames it reads would
    otherwise count in every later audit's peak RSS (a child inherits its
    parent's high-water mark across fork and exec)."""
    img = write_image(f"{out}/large.elf", gib=gib)
    frames = {}
    with ElfCore(img.path) as core:
        runs, max_pfn = core.file_runs(), core.end >> 12
    with open(img.path, "rb") as f:
        fd = f.fileno()
        for pfn, count, offset in runs:
            at, end = offset, offset + count * 4096
            while at < end:  # only the written (data) extents of the sparse file hold frames
                try:
                    at = os.lseek(fd, at, os.SEEK_DATA)
                except OSError:
                    break
                stop = min(os.lseek(fd, at, os.SEEK_HOLE), end)
                for i in range((at - offset) // 4096, -(-(stop - offset) // 4096)):
                    page = os.pread(fd, 4096, offset + i * 4096)
                    if page.strip(b"\0"):
                        frames[pfn + i] = page
                at = stop
    for name, kw in LARGE_KDUMPS.items():
        write_kdump(out / name, frames, max_pfn, **kw)
    print(f"({len(frames)} non-zero frames of {max_pfn}: the tables of a {gib} GiB machine)")
    return img.kernel_cr3


LARGE_KDUMPS = {"kdump-zlib.dump": dict(compression="zlib"), "kdump-lzo.dump": dict(compression="lzo"),
                "kdump-zlib-flattened.dump": dict(compression="zlib", flattened=True)}


def large(gib: int, repeat: int) -> bool:
    with tempfile.TemporaryDirectory(prefix="ptilab-bench-") as tmp:
        done = subprocess.run([sys.executable, __file__, "--prepare", tmp, "--gib", str(gib)],
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"preparing the large image failed: {done.stderr.strip()[-500:]}")
        *lines, cr3 = done.stdout.split()
        print("\n" + " ".join(lines))
        files = {"large.elf": Path(tmp) / "large.elf", **{n: Path(tmp) / n for n in LARGE_KDUMPS}}
        return compare(f"large: synthetic {gib} GiB PTI machine, kernel PGD", files, int(cr3), repeat)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare:
        print(prepare_large(args.prepare, args.gib))
        return 0
    ok = real(args.repeat)
    ok &= large(args.gib, args.repeat)
    print(f"\ntarget: kdump within {TARGET}x the ELF core's audit time and peak memory: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
