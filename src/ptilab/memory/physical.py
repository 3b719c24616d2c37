"""Physical memory behind one small interface: read 4 KiB frames by frame number.

Every source (the model's simulated RAM, an ELF core, a raw image) is one of
these, so the one walker in ptilab.paging serves them all.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Self

import numpy as np

from ptilab.errors import FrameOutsideMemory
from ptilab.paging.entry import PAGE_SHIFT, PAGE_SIZE

ENTRY_DTYPE = np.dtype("<u8")


class PhysicalMemory(ABC):
    """Frames of physical memory; a frame reads as 512 little-endian u64 entries."""

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
