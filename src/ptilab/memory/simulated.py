"""The model's RAM: sparse, zero-filled, holding only the frames something wrote."""

from __future__ import annotations

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
        self.entry_writes = 0

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
        self.entry_writes += len(values)

    def write_entry(self, pa: int, value: int) -> None:
        """Store one 8-byte entry, as a kernel's set_pte()/set_pmd() does."""
        pfn = pa >> PAGE_SHIFT
        if pa < 0 or pfn >= self.size >> PAGE_SHIFT:
            raise FrameOutsideMemory(pa)
        frame = self._frames.get(pfn)
        if frame is None:
            frame = self._frames[pfn] = np.zeros(512, dtype=np.uint64)
        frame[(pa & (PAGE_SIZE - 1)) >> 3] = value
        self.entry_writes += 1

    def written_frames(self) -> list[int]:
        """Frame numbers something wrote, ascending (every other frame reads as zeros)."""
        return sorted(self._frames)

    def clear_frame(self, pfn: int) -> None:
        self._frames.pop(pfn, None)
