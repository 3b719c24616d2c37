"""Find page-table roots in physical memory without symbols: frames whose
kernel half is the kernel's.

Every mm's PGD gets its kernel half from init_mm's: pgd_ctor() copies
swapper_pg_dir's entries from KERNEL_PGD_BOUNDARY (the direct map's slot)
to 511 with clone_pgd_range(), which under PTI copies the user twin's
kernel half too, and sync_global_pgds() writes every later kernel-half
change into every PGD on pgd_list. So all live PGDs hold the same 256
kernel-half entries, with one legitimate exception: the LDT remap slot
(LDT_BASE_ADDR = -240UL << PGDIR_SHIFT since 4.20, slot 272 in both 4- and
5-level paging), which map_ldt_struct() fills per mm when a process calls
modify_ldt(). The accessed bit is ignored too: hardware may set it in
whichever copy it walks (Linux's _KERNPG_TABLE already carries it).

The scan is one pass over the image in chunks of frames memory-mapped
straight from the file, each viewed as uint64[N, 512]: a probe column (one
kernel-half slot whose reference entry is present) picks the frames that
can match at all, and those are compared whole. A chunk is plain data
(path, first frame, count, file offset), so a worker elsewhere maps its
own chunk and nothing but frame numbers travels.
"""

from __future__ import annotations

import mmap
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ptilab.memory.physical import ENTRY_DTYPE, PhysicalMemory, data_rows
from ptilab.paging import entry as e

HALF = 256  # first kernel-half slot of the top-level table
LDT_SLOT = 512 - 240  # LDT_PGD_ENTRY: map_ldt_struct() sets it per mm
KERNEL_TEXT_SLOT = 511  # __START_KERNEL_map (and the kernel's PML5 slot): present in every root
IGNORED = np.uint64(e.A)
CHUNK_FRAMES = 1 << 18  # 1 GiB of image per chunk (one task)
BLOCK_FRAMES = 1 << 14  # 64 MiB compared at once: bounds the temporaries
# Bits a kernel-half top-level entry of Linux never carries: PS (no 512 GiB
# or 256 TiB pages), the software bits 52-58 and protection keys. Addresses
# past the end of memory and reserved bits are the walk's to catch.
NOT_IN_KERNEL_TOP = np.uint64(e.PS | e.PKEY_MASK | (0x7F << 52))


@dataclass(frozen=True)
class Chunk:
    """frames consecutive frames of the image at path, from frame number pfn.

    offset: the file offset of frame pfn's first byte, where the file holds
    the frames as they are (raw images, ELF cores); None to read them
    through the image's PhysicalMemory (compressed dumps)."""

    path: str
    pfn: int
    frames: int
    offset: int | None


def chunks(mem: PhysicalMemory, path: str, size: int = CHUNK_FRAMES) -> list[Chunk]:
    """The image's frames cut into chunks of at most size frames."""
    spans = mem.file_runs()
    if spans is None:
        spans = [(0, -(-mem.end // e.PAGE_SIZE), None)]
    out = []
    for pfn, count, offset in spans:
        for first in range(0, count, size):
            n = min(size, count - first)
            out.append(Chunk(path, pfn + first, n, None if offset is None else offset + first * e.PAGE_SIZE))
    return out


class _Frames:
    """A chunk's frames as uint64[N, 512], mapped from the file (or read) on
    entry, and which rows of it hold data (see blocks())."""

    def __init__(self, chunk: Chunk):
        self.chunk = chunk
        self._map: mmap.mmap | None = None
        self.pfns: np.ndarray | None = None
        self.extents: list[tuple[int, int]] = []

    def __enter__(self) -> np.ndarray:
        c = self.chunk
        if c.offset is None:
            from ptilab.memory.images import open_image
            mem = open_image(c.path)
            pfns = np.arange(c.pfn, c.pfn + c.frames, dtype=np.uint64)
            self.pfns = pfns[mem.frames_present(pfns)]
            self.extents = [(0, len(self.pfns))]
            return mem.read_frames(self.pfns)
        start = c.offset - c.offset % mmap.ALLOCATIONGRANULARITY
        length = c.frames * e.PAGE_SIZE
        with open(c.path, "rb") as f:
            self.extents = data_rows(f.fileno(), c.offset, c.frames)
            self._map = mmap.mmap(f.fileno(), c.offset - start + length, offset=start, access=mmap.ACCESS_READ)
        if hasattr(mmap, "MADV_SEQUENTIAL"):
            self._map.madvise(mmap.MADV_SEQUENTIAL)
        return np.ndarray((c.frames, 512), dtype=ENTRY_DTYPE, buffer=self._map, offset=c.offset - start)

    def blocks(self) -> Iterator[tuple[int, int]]:
        """Row ranges [lo, hi) of at most BLOCK_FRAMES rows covering every row with data."""
        for lo, hi in self.extents:
            for at in range(lo, hi, BLOCK_FRAMES):
                yield at, min(hi, at + BLOCK_FRAMES)

    def pfn_of(self, rows: np.ndarray) -> np.ndarray:
        if self.pfns is not None:
            return self.pfns[rows]
        return np.uint64(self.chunk.pfn) + rows.astype(np.uint64)

    def __exit__(self, *exc) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # a view is still alive somewhere; the map goes with it


def data_bytes(chunk: Chunk) -> int:
    """Bytes of chunk the scan reads: all of it but the holes of a sparse file
    (see memory.physical.data_rows); a compressed dump's frames are all read (and inflated)."""
    if chunk.offset is None:
        return chunk.frames * e.PAGE_SIZE
    with open(chunk.path, "rb") as f:
        return sum(hi - lo for lo, hi in data_rows(f.fileno(), chunk.offset, chunk.frames)) * e.PAGE_SIZE


def probe_slot(kernel_half: np.ndarray) -> int:
    """A kernel-half slot the reference fills (the kernel text's if it can),
    never the LDT slot: the column that rules out most frames at a glance."""
    present = [HALF + int(s) for s in np.flatnonzero(kernel_half & np.uint64(e.P))]
    present = [s for s in present if s != LDT_SLOT]
    if not present:
        raise ValueError("the reference kernel half maps nothing")
    return KERNEL_TEXT_SLOT if KERNEL_TEXT_SLOT in present else present[-1]


def match_kernel_half(frames: np.ndarray, kernel_half: np.ndarray) -> np.ndarray:
    """Rows of frames (uint64[N, 512]) whose kernel half equals kernel_half
    (uint64[256]) but for the accessed bit and the LDT slot."""
    probe = probe_slot(kernel_half)
    keep = ~IGNORED
    hit = np.flatnonzero(((frames[:, probe] ^ kernel_half[probe - HALF]) & keep) == 0)
    if not len(hit):
        return hit
    differ = (frames[hit, HALF:] ^ kernel_half) & keep
    differ[:, LDT_SLOT - HALF] = 0
    return hit[~differ.any(axis=1)]


def scan_chunk(chunk: Chunk, kernel_half: np.ndarray) -> np.ndarray:
    """Frame numbers in chunk whose kernel half matches (see match_kernel_half)."""
    found = [np.zeros(0, np.uint64)]
    source = _Frames(chunk)
    with source as frames:
        for lo, hi in source.blocks():
            rows = match_kernel_half(frames[lo:hi], kernel_half)
            found.append(source.pfn_of(rows + lo))
        del frames
    return np.concatenate(found)


def plausible_kernel_halves(frames: np.ndarray) -> np.ndarray:
    """Rows whose kernel half could be Linux's: the kernel-text slot and at
    least two others present, every present entry a plain table pointer."""
    text = frames[:, KERNEL_TEXT_SLOT]
    hit = np.flatnonzero(((text & np.uint64(e.P)) != 0) & ((text & NOT_IN_KERNEL_TOP) == 0))
    if not len(hit):
        return hit
    half = frames[hit, HALF:]
    present = (half & np.uint64(e.P)) != 0
    odd = ((half & NOT_IN_KERNEL_TOP) != 0) & present
    return hit[(present.sum(axis=1) >= 3) & ~odd.any(axis=1)]


def census_chunk(chunk: Chunk) -> Counter:
    """How many frames of chunk carry each plausible kernel half (keyed by its
    bytes, LDT slot and accessed bits cleared)."""
    counts: Counter = Counter()
    source = _Frames(chunk)
    with source as frames:
        for lo, hi in source.blocks():
            block = frames[lo:hi]
            rows = plausible_kernel_halves(block)
            if len(rows):
                halves = block[rows, HALF:] & ~IGNORED
                halves[:, LDT_SLOT - HALF] = 0
                counts.update(h.tobytes() for h in halves)
        del frames
    return counts


def _tables_in_memory(mem: PhysicalMemory, half: np.ndarray) -> bool:
    """Do half's present entries point at three or more distinct tables, all
    inside mem? Linux's kernel half does (pgd_populate() gives each slot a
    P4D/PUD table of its own); a fill pattern repeated over whole frames (one
    value in every slot, often past the end of memory) does not."""
    tables = (half[(half & np.uint64(e.P)) != 0] & np.uint64(e.ADDRESS_MASK)) >> np.uint64(e.PAGE_SHIFT)
    return len(np.unique(tables)) >= 3 and bool(mem.frames_present(tables).all())


def reference_half(counts: Counter, mem: PhysicalMemory) -> tuple[np.ndarray, int] | None:
    """The live kernel half among the census's: of the halves at least two
    frames share whose tables lie in memory, the one mapping the most slots,
    then the one most frames share; with how many do. None if none qualifies.

    Most slots, not most frames: under PTI every user PGD's kernel half
    (what pti_clone_*() shares: cpu_entry_area, entry text, cpu_tss_rw) repeats
    as often as the kernel's, less the kernel-only roots, and maps a subset of
    its slots; and Linux never clears a kernel-half top-level entry once set,
    so a stale half (a PGD freed before a later slot was filled) maps fewer."""
    best = None
    for key, n in counts.items():
        if n < 2:
            continue
        half = np.frombuffer(key, dtype=ENTRY_DTYPE)
        rank = (int(np.count_nonzero(half & np.uint64(e.P))), n)
        if (best is None or rank > best[0]) and _tables_in_memory(mem, half):
            best = rank, half
    return None if best is None else (best[1].copy(), best[0][1])
