"""Physical memory from a raw image: byte i of the file is physical address base + i.

What ``dd`` of /dev/mem, ``pmemsave`` in QEMU's monitor, or a cold-boot dump
give. The file is memory-mapped, never read whole.
"""

from __future__ import annotations

import mmap
import os
from typing import Iterator

import numpy as np

from ptilab.errors import FrameOutsideMemory, InputError
from ptilab.memory.physical import BLOCK_FRAMES, ENTRY_DTYPE, PhysicalMemory, mapped_frame_blocks
from ptilab.paging.entry import PAGE_SHIFT, PAGE_SIZE


class RawImage(PhysicalMemory):
    """Physical memory as one flat file starting at physical address ``base``.

    ``base`` must be 4 KiB aligned. Frames ``base >> 12`` up to the last whole
    4 KiB of the file are present; nothing else is.
    """

    def __init__(self, path: str | os.PathLike[str], base: int = 0):
        self.path = os.fspath(path)
        if base < 0 or base % PAGE_SIZE:
            raise InputError(f"{self.path}: base {base:#x} is not a 4 KiB-aligned physical address")
        self.base = base
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < PAGE_SIZE:
                    raise InputError(f"{self.path}: {size} bytes, less than one 4 KiB frame")
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as ex:
            raise InputError(f"{self.path}: cannot read: {ex.strerror or ex}") from None
        # A trailing partial frame is absent rather than zero-padded: a dump
        # cut short mid-frame says nothing about the bytes it lacks, and a
        # table read from invented zeros would silently map nothing.
        self.frames = size // PAGE_SIZE
        self._first = np.uint64(base >> PAGE_SHIFT)
        self._view = np.ndarray((self.frames, 512), dtype=ENTRY_DTYPE, buffer=self._mmap)

    @property
    def end(self) -> int:
        return self.base + self.frames * PAGE_SIZE

    def file_runs(self) -> list[tuple[int, int, int]]:
        """(first frame number, frames, file offset) of the frames the file holds as they are."""
        return [(self.base >> PAGE_SHIFT, self.frames, 0)]

    def frame_blocks(self, frames: int = BLOCK_FRAMES) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The file's frames as views of its mapping, a sparse file's holes left out."""
        return mapped_frame_blocks(self.path, self._mmap, self.file_runs(), frames)

    def frames_present(self, pfns: np.ndarray) -> np.ndarray:
        pfns = np.asarray(pfns, dtype=np.uint64)
        return (pfns >= self._first) & (pfns - self._first < np.uint64(self.frames))

    def read_frames(self, pfns: np.ndarray) -> np.ndarray:
        pfns = np.asarray(pfns, dtype=np.uint64)
        inside = self.frames_present(pfns)
        if not inside.all():
            raise FrameOutsideMemory(int(pfns[~inside][0]) << PAGE_SHIFT)
        return self._view[pfns - self._first]

    def close(self) -> None:
        """Unmap the file; frames already read are copies and stay valid."""
        del self._view
        self._mmap.close()

    def __repr__(self) -> str:
        return f"RawImage({self.path!r}, base={self.base:#x}, {self.frames} frames)"
