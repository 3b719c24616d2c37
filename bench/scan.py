"""Benchmark: `ptilab scan`, on one core and on Dask workers.

1. Root-finding speed on a dense image: every frame holds data (a random
   block repeated, the page tables of bench/large_image.py written over it),
   read warm from the page cache by one process. Target (issue 14): at least
   1 GiB of image per second per core. Baseline measured in the same run: the
   naive comparison of every frame's whole kernel half (no probe column).
   The same image is then scanned in 256 MiB chunks on 1 and on 2 workers.
2. 16 synthetic images (bench/large_image.py) scanned on a local cluster of 1
   and of 2 worker processes, and in this process: sparse images (tables
   only), and 16 names of one dense image (every frame data, all in the page
   cache). The settings run in turn, round after round (the machine is
   shared: its load falls on all alike), medians printed with the load
   average before each run and the cores each setting kept busy (the tasks'
   CPU seconds over the wall time).
3. One 64 GiB sparse image: scanned in this process and in 4 GiB chunks over
   2 workers. The holes are not read (lseek SEEK_DATA: a hole reads as zeros,
   which match no kernel half); the bench prints the bytes covered and the
   bytes read, and the scan reads every allocated frame.

    python bench/scan.py [--dense-gib 4] [--images 16] [--image-gib 4] [--dense-fleet-gib 1] [--big-gib 64]
                         [--rounds 3] [--parts dense,many,dense-many,big] [--dir /tmp/ptilab-bench]

The machine's other load shows in the numbers: run it on an idle machine.
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

from bench.large_image import GIB, build, write_image  # noqa: E402
from ptilab.memory.elfwrite import qemu_cpu_note, write_elf_core  # noqa: E402

TARGET_GIB_S = 1.0
BLOCK = 64 << 20


def dense_image(path: Path, gib: int) -> Path:
    """gib GiB where every frame holds data, with bench/large_image.py's tables over it."""
    if path.exists() and path.stat().st_size >= gib * GIB:
        return path
    rng = np.random.default_rng(14)
    block = rng.integers(0, 1 << 63, BLOCK // 8, dtype=np.uint64)
    kcr3, ucr3, chunks, _, _ = build(gib)
    offsets = write_elf_core(path, [(0, gib * GIB)], notes=[qemu_cpu_note(cr3=kcr3), qemu_cpu_note(cr3=ucr3, cs=0x33)],
                             align=4096)
    with open(path, "r+b") as f:
        f.seek(offsets[0])
        for _ in range(gib * GIB // BLOCK):
            f.write(block.tobytes())
        for pa, data in chunks:
            f.seek(offsets[0] + pa)
            f.write(np.ascontiguousarray(data).tobytes())
    return path


def bench_dense(directory: Path, gib: int) -> None:
    from ptilab.memory.images import open_image
    from ptilab.scan import roots
    from ptilab.scan.spaces import choose_reference, scan_image

    path = str(dense_image(directory / f"dense-{gib}g.elf", gib))
    mem = open_image(path)
    parts = roots.chunks(mem, path)
    ref = choose_reference(mem, parts, None).kernel_half
    for part in parts:  # warm the page cache: the target is the scan, not the disk
        roots.census_chunk(part)

    def timed(fn) -> tuple[float, float]:
        """Best of 3: (wall seconds, CPU seconds of this process, user + system: page faults count)."""
        best = (float("inf"), float("inf"))
        for _ in range(3):
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
        return best

    probe = timed(lambda: [roots.scan_chunk(p, ref) for p in parts])

    def naive() -> None:
        for p in parts:
            view = np.memmap(path, np.uint64, "r", offset=p.offset, shape=(p.frames, 512))
            for lo in range(0, p.frames, roots.BLOCK_FRAMES):
                np.flatnonzero((view[lo:lo + roots.BLOCK_FRAMES, 256:] == ref).all(axis=1))

    whole = timed(naive)
    census = timed(lambda: [roots.census_chunk(p) for p in parts])
    end_to_end = timed(lambda: scan_image(path))
    spread = {w: _on_cluster(w, lambda run: min(_timed(lambda: scan_image(path, run=run, chunk_frames=1 << 16))[0]
                                                for _ in range(3)))[1] for w in (1, 2)}
    rate = lambda t: f"{gib / t[1]:7.2f} GiB/s per CPU-second ({gib / t[0]:.2f} GiB/s wall)"
    print(f"dense {gib} GiB, one process, page cache warm, load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores:")
    print(f"  find roots (probe column + whole half): {rate(probe)}; target {TARGET_GIB_S} GiB/s per core: "
          f"ratio {gib / probe[1] / TARGET_GIB_S:.2f}")
    print(f"  baseline, whole kernel half of every frame: {rate(whole)}; the probe is "
          f"{whole[1] / probe[1]:.1f}x faster")
    print(f"  census (no reference):                   {rate(census)}")
    print(f"  scan_image end to end (walk + audit too): {rate(end_to_end)}")
    print(f"  the same, 256 MiB chunks on a local cluster (wall): 1 worker {spread[1]:.2f} s, "
          f"2 workers {spread[2]:.2f} s: speed-up {spread[1] / spread[2]:.2f}x")


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _warm(_: int) -> None:
    import ptilab.scan.spaces  # noqa: F401


def _on_cluster(workers: int, fn) -> tuple[float, object]:
    """fn(run) timed on a local cluster of workers processes, started (and warmed) before the clock."""
    from ptilab.scan.cluster import dask_runner

    with dask_runner("bench", workers=workers) as run:
        run(_warm, [0] * (4 * workers))  # every worker up, ptilab imported
        return _timed(lambda: fn(run))


class _CpuTimed:
    """task(item), also returning the CPU seconds the worker process spent on it:
    their sum over the wall time is how many cores the run really had."""

    def __init__(self, task):
        self.task = task

    def __call__(self, item):
        cpu = time.process_time()
        result = self.task(item)
        return time.process_time() - cpu, result


def _load() -> str:
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def _alternate(rounds: int, runs: dict) -> dict:
    """Each of runs' functions (returning (wall, cpu, result)) once per round, in turn, so the
    other load on the machine falls on all of them alike; every run, and the load before it."""
    out = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            load = os.getloadavg()[0]
            wall, cpu, result = fn()
            out[name].append((wall, cpu, load, result))
    return out


def _median(rows: list, i: int) -> float:
    return statistics.median(r[i] for r in rows)


def fleet(directory: Path, count: int, gib: int, dense: bool) -> list[str]:
    """count images of bench/large_image.py's tables: sparse ones of their own, or
    (dense) count names of one dense image, so the page cache holds them all."""
    paths = []
    for i in range(count):
        path = directory / f"fleet-{'dense-' if dense else ''}{gib}g-{i}.elf"
        if dense and not path.exists():
            path.symlink_to(dense_image(directory / f"dense-{gib}g.elf", gib))
        elif not path.exists():
            write_image(path, gib)
        paths.append(str(path))
    return paths


def bench_many(directory: Path, count: int, gib: int, rounds: int, dense: bool) -> None:
    from ptilab.scan.batch import ScanTask
    from ptilab.scan.cluster import dask_runner

    paths = fleet(directory, count, gib, dense)
    task = _CpuTimed(ScanTask(None))
    for p in paths:  # the page cache warm for every run alike
        task(p)

    def here():
        wall, cpu = time.perf_counter(), time.process_time()
        rs = [task(p)[1] for p in paths]
        return time.perf_counter() - wall, time.process_time() - cpu, rs

    def on(run):
        def go():
            wall, rows = _timed(lambda: run(task, paths))
            return wall, sum(c for c, _ in rows), [r for _, r in rows]
        return go

    kind = "names of one dense image: every frame data, read" if dense else "sparse: tables only"
    print(f"{count} images of {gib} GiB ({kind}), one task per image, clusters started and warmed before "
          f"the clock, {rounds} rounds alternating; {os.cpu_count()} cores, {_load()} before:")
    with dask_runner("bench", workers=1) as one, dask_runner("bench", workers=2) as two:
        one(_warm, [0] * 4)
        two(_warm, [0] * 8)
        out = _alternate(rounds, {"in process": here, "1 worker": on(one), "2 workers": on(two)})
    verdicts = [[[s.verdict for s in r.spaces] for r in row[3]] for rows in out.values() for row in rows]
    for name, rows in out.items():
        print(f"  {name:10s} median {_median(rows, 0):6.2f} s wall, {_median(rows, 1):6.2f} CPU-s "
              f"({_median(rows, 1) / _median(rows, 0):.2f} cores busy); runs "
              + ", ".join(f"{w:.2f} s at load {ld:.2f}" for w, _, ld, _ in rows))
    one_w, two_w = _median(out["1 worker"], 0), _median(out["2 workers"], 0)
    print(f"  speed-up 2 workers / 1 worker: {one_w / two_w:.2f}x (wall, medians); per CPU-second "
          f"{_median(out['1 worker'], 1) / _median(out['2 workers'], 1):.2f}x; same verdicts in every run: "
          f"{all(v == verdicts[0] for v in verdicts)}; {_load()} after")


def bench_big(directory: Path, gib: int, rounds: int) -> None:
    from ptilab.scan.cluster import dask_runner
    from ptilab.scan.spaces import scan_image

    path = str(directory / f"pti-{gib}g.elf")
    if not os.path.exists(path):
        write_image(path, gib)
    scan_image(path)  # the page cache warm for every run alike

    def here():
        wall, cpu = time.perf_counter(), time.process_time()
        result = scan_image(path)
        return time.perf_counter() - wall, time.process_time() - cpu, result

    def on(run):
        def go():
            wall, result = _timed(lambda: scan_image(path, run=run, chunk_frames=1 << 20))
            return wall, float("nan"), result
        return go

    print(f"one {gib} GiB image (sparse: {os.stat(path).st_blocks * 512 >> 20} MiB allocated), {rounds} rounds "
          f"alternating, {_load()} before:")
    with dask_runner("bench", workers=2) as two:
        two(_warm, [0] * 8)
        out = _alternate(rounds, {"in process": here, "2 workers": on(two)})
    s0 = out["in process"][0][3]
    print(f"  scan covers {s0.bytes_scanned >> 30} GiB and reads {s0.bytes_read >> 20} MiB: the holes "
          f"(lseek SEEK_DATA/SEEK_HOLE) read as zeros, which match no kernel half, so they are not read; "
          f"the allocated frames are all read; 2 workers get {gib // 4} chunks of 4 GiB")
    for name, rows in out.items():
        print(f"  {name:10s} median {_median(rows, 0):6.2f} s wall; runs "
              + ", ".join(f"{w:.2f} s at load {ld:.2f}" for w, _, ld, _ in rows))
    print(f"  in process: {_median(out['in process'], 1):.2f} CPU-s, "
          f"{gib / _median(out['in process'], 0):.1f} GiB covered per s; speed-up of 2 workers "
          f"{_median(out['in process'], 0) / _median(out['2 workers'], 0):.2f}x; "
          f"{len(s0.spaces)} address space(s), verdict {s0.spaces[0].verdict}; same verdicts: "
          f"{all([s.verdict for s in r[3].spaces] == [s.verdict for s in s0.spaces] for rows in out.values() for r in rows)}; "
          f"{_load()} after")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense-gib", type=int, default=4)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--image-gib", type=int, default=4)
    parser.add_argument("--big-gib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of each setting (medians)")
    parser.add_argument("--dense-fleet-gib", type=int, default=1)
    parser.add_argument("--parts", default="dense,many,dense-many,big")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ptilab-bench"))
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    if "dense" in parts:
        bench_dense(args.dir, args.dense_gib)
    if "many" in parts:
        bench_many(args.dir, args.images, args.image_gib, args.rounds, dense=False)
    if "dense-many" in parts:
        bench_many(args.dir, args.images, args.dense_fleet_gib, args.rounds, dense=True)
    if "big" in parts:
        bench_big(args.dir, args.big_gib, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
