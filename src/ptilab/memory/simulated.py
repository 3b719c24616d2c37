"""The model's RAM: sparse, zero-filled, holding only the frames something wrote."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ptilab.errors import FrameOutsideMemory
from ptilab.memory.physical import PhysicalMemory
from ptilab.paging.entry import PAGE_SHIFT, PAGE_SIZE


class SimulatedRAM(PhysicalMemory):
    def __init__(self, size: int):
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"RAM size must be a positive multiple of 4 KiB, not {size:#x}")
        self.size = size
        self._frames: dict[int, np.ndarray] = {}
        self._zero = np.zeros(512, dtype=np.uint64)

    @property
    def end(self) -> int:
        return self.size

    def frames_present(self, pfns: np.ndarray) -> np.ndarray:
        return np.asarray(pfns, dtype=np.uint64) < (self.size >> PAGE_SHIFT)

    def read_frames(self, pfns: np.ndarray) -> np.ndarray:
        frames = self._frames
        zero = self._zero
        rows = [frames.get(int(p), zero) for p in np.asarray(pfns, dtype=np.uint64)]
        if not rows:
            return np.zeros((0, 512), dtype=np.uint64)
        return np.stack(rows)

    def frame_blocks(self, frames: int = 1 << 14) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Only the frames something wrote: every other frame reads as zeros."""
        written = np.array(sorted(self._frames), dtype=np.uint64)
        for at in range(0, len(written), frames):
            pfns = written[at:at + frames]
            yield pfns, self.read_frames(pfns)

    def read_entry(self, pa: int) -> int:
        # The boot model reads entries one at a time in its hottest loop:
        # skip the batch machinery of read_frames().
        frame = self._frames.get(pa >> PAGE_SHIFT)
        if frame is None:
            if pa >> PAGE_SHIFT >= self.size >> PAGE_SHIFT:
                raise FrameOutsideMemory(pa)
            return 0
        return int(frame[(pa & (PAGE_SIZE - 1)) >> 3])

    def read_frame(self, pfn: int) -> np.ndarray:
        if pfn >= self.size >> PAGE_SHIFT:
            raise FrameOutsideMemory(pfn << PAGE_SHIFT)
        return self._frames.get(pfn, self._zero)

    def write_entries(self, pa: int, values: np.ndarray) -> None:
        """Store consecutive entries of one table in one go (values must not cross the frame)."""
        pfn = pa >> PAGE_SHIFT
        first = (pa & (PAGE_SIZE - 1)) >> 3
        if first + len(values) > 512:
            raise ValueError("entries cross a table boundary")
        if pfn >= self.size >> PAGE_SHIFT:
            raise FrameOutsideMemory(pa)
        frame = self._frames.get(pfn)
        if frame is None:
            frame = self._frames[pfn] = np.zeros(512, dtype=np.uint64)
        frame[first:first + len(values)] = values

    def write_entry(self, pa: int, value: int) -> None:
        """Store one 8-byte entry, as a kernel's set_pte()/set_pmd() does."""
        pfn = pa >> PAGE_SHIFT
        if pa < 0 or pfn >= self.size >> PAGE_SHIFT:
            raise FrameOutsideMemory(pa)
        frame = self._frames.get(pfn)
        if frame is None:
            frame = self._frames[pfn] = np.zeros(512, dtype=np.uint64)
        frame[(pa & (PAGE_SIZE - 1)) >> 3] = value

    def write_slots(self, slots: np.ndarray, values: np.ndarray) -> None:
        """Store entries at distinct addresses, a table at a time (a batch's slots come grouped by table)."""
        self._check_slots(slots)
        for pfn, at, lo, hi in self._by_frame(slots):
            frame = self._frames.get(pfn)
            if frame is None:
                frame = self._frames[pfn] = np.zeros(512, dtype=np.uint64)
            frame[at[lo:hi]] = values[lo:hi]

    def read_slots(self, slots: np.ndarray) -> np.ndarray:
        """The entries at these addresses."""
        self._check_slots(slots)
        out = np.zeros(len(slots), dtype=np.uint64)
        for pfn, at, lo, hi in self._by_frame(slots):
            if pfn in self._frames:
                out[lo:hi] = self._frames[pfn][at[lo:hi]]
        return out

    def _check_slots(self, slots: np.ndarray) -> None:
        if len(slots) and int(slots.max()) >> PAGE_SHIFT >= self.size >> PAGE_SHIFT:
            raise FrameOutsideMemory(int(slots.max()))

    @staticmethod
    def _by_frame(slots: np.ndarray) -> Iterator[tuple[int, np.ndarray, int, int]]:
        """(frame number, entry indices, lo, hi) for each run slots[lo:hi] in one frame."""
        if not len(slots):
            return
        pfns = slots >> np.uint64(PAGE_SHIFT)
        at = ((slots & np.uint64(PAGE_SIZE - 1)) >> np.uint64(3)).astype(np.intp)
        bounds = np.flatnonzero(pfns[1:] != pfns[:-1]) + 1
        los, his = np.append(0, bounds), np.append(bounds, len(slots))
        for pfn, lo, hi in zip(pfns[los].tolist(), los.tolist(), his.tolist()):
            yield pfn, at, lo, hi

    def written_frames(self) -> list[int]:
        """Frame numbers something wrote, ascending (every other frame reads as zeros)."""
        return sorted(self._frames)

    def clear_frame(self, pfn: int) -> None:
        self._frames.pop(pfn, None)
