"""`ptilab log` on a 64 GiB image reads only the frames the printk ring spans.

The image is a sparse ELF core of N GiB (default 64) holding, at their own
physical addresses, the frames a real boot's log needs: the ring's header,
descriptors, infos and text, and the page tables from init_top_pgt down to
them (taken from a real-kernel fixture, default pti-kaslr, by reading its log
once through a counting wrapper), with the fixture's VMCOREINFO note. Every
other frame is a hole.

The bench opens that image, reads the log through a wrapper that counts the
frames read, and prints the frames read against the ring's frames, and the
time, against a baseline in the same run: one pass over the whole image
(pread in 16 MiB chunks, holes included), what a reader that searched memory
for the log, or copied the image first, would pay at the least.

    python bench/printk.py [--gib 64] [--config pti-kaslr] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ptilab.linux.printk import format_dmesg, image_vmcoreinfo, read_ring  # noqa: E402
from ptilab.memory.elfwrite import write_elf_core  # noqa: E402
from ptilab.memory.images import open_image  # noqa: E402
from ptilab.memory.physical import PhysicalMemory  # noqa: E402

GIB = 1 << 30
CHUNK = 16 << 20


class CountingMemory(PhysicalMemory):
    """A memory source passed through, counting the distinct frames read (tables included:
    PhysicalMemory.read_entry() reads through read_frames())."""

    def __init__(self, inner: PhysicalMemory):
        self.inner = inner
        self.read: set[int] = set()
        self.vmcoreinfo_text = getattr(inner, "vmcoreinfo_text", "")

    @property
    def end(self) -> int:
        return self.inner.end

    def frames_present(self, pfns: np.ndarray) -> np.ndarray:
        return self.inner.frames_present(pfns)

    def read_frames(self, pfns: np.ndarray) -> np.ndarray:
        self.read.update(int(p) for p in np.asarray(pfns).tolist())
        return self.inner.read_frames(pfns)


def write_image(path: Path, config: str, gib: int) -> tuple[set[int], str]:
    """The sparse image; returns the frames it holds and the fixture log's text."""
    fixture = open_image(ROOT / "tests/realkernel/out" / config / "core.elf")
    counted = CountingMemory(fixture)
    log = read_ring(counted, image_vmcoreinfo(counted, config))
    frames = sorted(counted.read)
    if (frames[-1] + 1) << 12 > gib * GIB:
        raise SystemExit(f"{config}'s ring lies above {gib} GiB")
    pages = [(pfn << 12, fixture.read_frame(pfn)) for pfn in frames]
    write_elf_core(path, [(0, gib * GIB)], [(b"VMCOREINFO", 0, fixture.vmcoreinfo_text.encode())], pages,
                   align=4096)
    return set(frames), format_dmesg(log.records)


def read_log(path: Path) -> tuple[float, int, int, str]:
    """(seconds, frames read, the ring's frames, the log's text) of one read of the log."""
    start = time.perf_counter()
    mem = CountingMemory(open_image(path))
    log = read_ring(mem, image_vmcoreinfo(mem, str(path)))
    text = format_dmesg(log.records)
    return time.perf_counter() - start, len(mem.read), len(log.frames), text


def read_whole(path: Path) -> float:
    """Seconds for one pass over every byte of the file."""
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        offset, size = 0, os.fstat(fd).st_size
        while offset < size:
            offset += len(os.pread(fd, CHUNK, offset)) or size
    finally:
        os.close(fd)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=int, default=64)
    parser.add_argument("--config", default="pti-kaslr")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline-runs", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ptilab-bench-printk-") as tmp:
        path = Path(tmp) / f"{args.gib}g.elf"
        held, want = write_image(path, args.config, args.gib)
        print(f"{path.name}: {args.gib} GiB sparse ELF, {len(held)} frames held "
              f"({os.stat(path).st_blocks * 512 >> 10} KiB on disk), {args.config}'s log")
        logs = [read_log(path) for _ in range(args.runs)]
        _, read, ring, text = logs[0]
        assert text == want, "the log read from the large image differs from the fixture's"
        whole = [read_whole(path) for _ in range(args.baseline_runs)]
        t_log, t_whole = statistics.median(r[0] for r in logs), statistics.median(whole)
        total = args.gib * GIB >> 12
        print(f"ptilab log:       {t_log * 1000:8.1f} ms  frames read {read} of {total} "
              f"(the ring spans {ring}; the other {read - ring} are page tables on the way)")
        print(f"read whole image: {t_whole * 1000:8.1f} ms  frames read {total}")
        print(f"ratio: the log takes {t_log / t_whole:.5f}x a pass over the image and reads "
              f"{read / total:.2e} of its frames")


if __name__ == "__main__":
    main()
