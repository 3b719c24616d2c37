"""Physical memory behind one small interface: read 4 KiB frames by frame number.

Every source (the model's simulated RAM, an ELF core, a raw image) is one of
these, so the one walker in ptilab.paging serves them all.
"""

from __future__ import annotations

import errno
import mmap
import os
from abc import ABC, abstractmethod
from functools import cached_property
from typing import TYPE_CHECKING, Iterator, Self

import numpy as np

from ptilab.errors import FrameOutsideMemory
from ptilab.paging.entry import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from ptilab.memory.elfcore import CpuState
    from ptilab.memory.vmcoreinfo import VmcoreInfo

ENTRY_DTYPE = np.dtype("<u8")
BLOCK_FRAMES = 1 << 14  # 64 MiB of frames per block of frame_blocks(): bounds the copies a block costs


class PhysicalMemory(ABC):
    """Frames of physical memory; a frame reads as 512 little-endian u64 entries.

    What a dump says about itself beside its memory (each source sets what its
    format carries; the defaults say "nothing"):

    cpus: one CpuState per CPU from QEMU's per-CPU notes ("QEMU" notes, type 0),
        in QEMU's CPU order; () when the dump holds none (kdump, LiME, raw).
    prstatus_cpus: how many NT_PRSTATUS notes (one per CPU the kernel saved) the dump holds.
    vmcoreinfo_text: the text of the dump's VMCOREINFO note, "" without one; read it
        decoded through ``vmcoreinfo``, the one parse.
    """

    cpus: tuple[CpuState, ...] = ()
    prstatus_cpus: int = 0
    vmcoreinfo_text: str = ""

    @abstractmethod
    def frames_present(self, pfns: np.ndarray) -> np.ndarray:
        """Boolean mask: which of these frame numbers the source holds."""

    @abstractmethod
    def read_frames(self, pfns: np.ndarray) -> np.ndarray:
        """An (n, 512) uint64 array, one row per frame; every frame must be present."""

    @property
    @abstractmethod
    def end(self) -> int:
        """One past the highest physical address held."""

    def close(self) -> None:
        """Release the file behind the source; frames already read stay valid. Nothing to release by default."""

    @cached_property
    def vmcoreinfo(self) -> VmcoreInfo | None:
        """The kernel's VMCOREINFO, decoded once: from the dump's note, else, in a
        dump without one (LiME, raw, QEMU without ``-device vmcoreinfo``), the
        copy the kernel keeps in RAM when a search of the frames finds one that
        its own page tables confirm (memory.vmcoreinfo.find_vmcoreinfo); None
        when neither. ``VmcoreInfo.source`` says which. The search reads every
        frame once, so it runs only when this is first asked for.

        Raises InputError when the note is malformed."""
        from ptilab.memory.vmcoreinfo import parse_vmcoreinfo

        if self.vmcoreinfo_text:
            return parse_vmcoreinfo(self.vmcoreinfo_text)
        return self._vmcoreinfo_in_memory()

    def _vmcoreinfo_in_memory(self) -> VmcoreInfo | None:
        from ptilab.memory.vmcoreinfo import find_vmcoreinfo

        return find_vmcoreinfo(self)

    def file_runs(self) -> list[tuple[int, int, int]] | None:
        """(first frame number, frames, file offset) of the frames the file
        holds as they are, byte for byte, in frame order; None when the
        source holds none that way (a compressed dump, the model's RAM)."""
        return None

    def frame_blocks(self, frames: int = BLOCK_FRAMES) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every frame the source holds, in blocks of at most ``frames``:
        ``(pfns, uint64[n, 512])``, the rows read-only and valid until the
        next block. By default read through read_frames(); a file source
        overrides it with views of its mapping (no copy, holes skipped)."""
        last = -(-self.end // PAGE_SIZE)
        for first in range(0, last, frames):
            pfns = np.arange(first, min(last, first + frames), dtype=np.uint64)
            pfns = pfns[self.frames_present(pfns)]
            if len(pfns):
                yield pfns, self.read_frames(pfns)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read_frame(self, pfn: int) -> np.ndarray:
        pfns = np.array([pfn], dtype=np.uint64)
        if not self.frames_present(pfns)[0]:
            raise FrameOutsideMemory(pfn << PAGE_SHIFT)
        return self.read_frames(pfns)[0]

    def read_entry(self, pa: int) -> int:
        """The 8-byte entry at physical address pa (8-byte aligned, as the MMU reads it)."""
        return int(self.read_frame(pa >> PAGE_SHIFT)[(pa & (PAGE_SIZE - 1)) >> 3])

    def read(self, pa: int, length: int) -> bytes:
        """Bytes at a physical address, frame by frame (used for data, not tables)."""
        out = bytearray()
        while length > 0:
            offset = pa & (PAGE_SIZE - 1)
            chunk = min(length, PAGE_SIZE - offset)
            out += self.read_frame(pa >> PAGE_SHIFT).tobytes()[offset:offset + chunk]
            pa += chunk
            length -= chunk
        return bytes(out)


class SegmentedMemory(PhysicalMemory):
    """A source whose frames lie in sorted, disjoint frame ranges [_lo[i], _hi[i])
    (an ELF core's or /proc/kcore's PT_LOADs), which the subclass sets."""

    _lo: np.ndarray
    _hi: np.ndarray

    def frames_present(self, pfns: np.ndarray) -> np.ndarray:
        return self._segment_of(np.asarray(pfns, dtype=np.uint64)) >= 0

    def _segment_of(self, pfns: np.ndarray) -> np.ndarray:
        """For each frame, the index of the range holding it, or -1."""
        seg = np.searchsorted(self._lo, pfns, side="right").astype(np.int64) - 1
        if not len(self._lo):
            return seg
        return np.where((seg >= 0) & (pfns < self._hi[np.maximum(seg, 0)]), seg, -1)

    def _segments_of_held(self, pfns: np.ndarray) -> np.ndarray:
        """_segment_of() of frames that must all be held: FrameOutsideMemory for the first that is not."""
        seg = self._segment_of(pfns)
        if (seg < 0).any():
            raise FrameOutsideMemory(int(pfns[seg < 0][0]) << PAGE_SHIFT)
        return seg


def data_rows(fd: int, offset: int, frames: int) -> list[tuple[int, int]]:
    """Rows (frames from offset) that hold file data, as [lo, hi) ranges.

    A hole in a sparse file reads as zeros, and what a reader of frames
    looks for (a kernel half with present entries, VMCOREINFO's text) is
    never all zeros, so skipping holes (lseek SEEK_DATA/SEEK_HOLE) changes
    no answer; it only spares the kernel filling the page cache with zero
    pages."""
    end = offset + frames * PAGE_SIZE
    if not hasattr(os, "SEEK_DATA"):
        return [(0, frames)]
    rows: list[tuple[int, int]] = []
    pos = offset
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
            hole = os.lseek(fd, data, os.SEEK_HOLE)
        except OSError as ex:
            if ex.errno == errno.ENXIO:  # no data past pos
                break
            return [(0, frames)]  # the file system cannot tell: read it all
        if data >= end:
            break
        lo = (data - offset) // PAGE_SIZE
        hi = min(frames, -(-(min(hole, end) - offset) // PAGE_SIZE))
        if rows and rows[-1][1] >= lo:
            rows[-1] = (rows[-1][0], max(rows[-1][1], hi))
        else:
            rows.append((lo, hi))
        pos = hole
    return rows


def mapped_frame_blocks(path: str, mapping: mmap.mmap, runs: list[tuple[int, int, int]],
                        frames: int = BLOCK_FRAMES) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """PhysicalMemory.frame_blocks() of a file mapped whole: views of mapping
    over each run of file_runs(), the holes of a sparse file left out."""
    with open(path, "rb") as f:
        extents = [(pfn, offset, data_rows(f.fileno(), offset, count)) for pfn, count, offset in runs]
    for pfn, offset, rows in extents:
        for lo, hi in rows:
            for at in range(lo, hi, frames):
                n = min(hi, at + frames) - at
                view = np.ndarray((n, 512), dtype=ENTRY_DTYPE, buffer=mapping, offset=offset + at * PAGE_SIZE)
                yield np.arange(pfn + at, pfn + at + n, dtype=np.uint64), view
