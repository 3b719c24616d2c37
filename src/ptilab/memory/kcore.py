"""Physical memory of the running kernel, read through ``/proc/kcore``.

``/proc/kcore`` (fs/proc/kcore.c, read_kcore_iter()) is an ELF64 ``ET_CORE``
file of kernel *virtual* memory, built afresh on every read:

- one ``PT_LOAD`` per ``kcore_list`` entry: ``p_vaddr`` is the virtual start,
  ``p_offset`` is ``kc_vaddr_to_offset(vaddr) + data_offset``, i.e. ``vaddr -
  PAGE_OFFSET`` plus the page-aligned size of the headers and notes. On
  x86-64 the kernel text (0xffffffff8...) lands ~120 TiB into the file, which
  is why the file is 128 TiB long and must never be read whole;
- ``p_paddr`` is ``__pa(vaddr)`` for ``KCORE_RAM`` segments (the direct map
  of each System RAM range) and ``__pa_symbol(vaddr)`` for ``KCORE_TEXT``,
  ``-1`` for vmalloc, vmemmap and the rest. Linux sets it since 4.11
  ("proc/kcore: update physical address for kcore ram and text"); before
  that it was 0;
- a ``PT_NOTE`` with ``CORE`` notes (an empty NT_PRSTATUS, NT_PRPSINFO,
  NT_TASKSTRUCT) and, since 4.19, ``VMCOREINFO``.

A physical frame is therefore read at ``p_offset + (pa - p_paddr)`` of the
segment holding it: one ``pread`` of 4 KiB, nothing else. Pages the kernel
may not touch (offline, hwpoisoned, balloon-inflated) read as zeros.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ptilab.errors import InputError
from ptilab.memory.elfcore import PT_LOAD, PT_NOTE, CoreNotes, read_program_headers
from ptilab.memory.physical import ENTRY_DTYPE, SegmentedMemory
from ptilab.paging.entry import PAGE_SHIFT, PAGE_SIZE

NO_PADDR = (1 << 64) - 1  # (elf_addr_t)-1: a segment with no physical address
MAX_PHNUM = 1 << 16  # one per System RAM range and vmemmap piece, plus a few: thousands at most
MAX_NOTES = 1 << 20  # task_struct (~10 KiB) and VMCOREINFO (a page) dominate


@dataclass(frozen=True)
class KcoreSegment:
    """One PT_LOAD of /proc/kcore."""

    vaddr: int
    paddr: int  # NO_PADDR when the kernel gave none
    offset: int
    size: int


class Kcore(SegmentedMemory):
    """Physical memory behind /proc/kcore's segments that carry a physical address.

    Attributes:
        path: the file read.
        segments: every PT_LOAD, in file order.
        vmcoreinfo_text: the ``VMCOREINFO`` note's text, or "" (before 4.19).
        cpus, prstatus_cpus: none; /proc/kcore holds no CPU notes.
    """

    def __init__(self, path: str | os.PathLike[str] = "/proc/kcore", fd: int | None = None):
        """Read the headers of path; fd, when given, is path already opened (and now owned)."""
        self.path = os.fspath(path)
        if fd is None:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as ex:
                raise InputError(f"{self.path}: cannot read: {ex.strerror or ex}") from None
        self._fd: int | None = fd
        try:
            self.segments, self.vmcoreinfo_text = self._read_headers()
        except BaseException:
            self.close()
            raise
        self._index_physical()

    # -- headers ------------------------------------------------------------------

    def _pread(self, length: int, offset: int) -> bytes:
        try:
            return os.pread(self._fd, length, offset)
        except (OSError, OverflowError) as ex:
            raise InputError(f"{self.path}: read of {length} bytes at offset {offset:#x} failed: "
                             f"{getattr(ex, 'strerror', None) or ex}") from None

    def _read_headers(self) -> tuple[tuple[KcoreSegment, ...], str]:
        size = os.fstat(self._fd).st_size
        segments, notes = [], None
        for h in read_program_headers(self._pread, size, self.path, max_phnum=MAX_PHNUM):
            if h.type == PT_NOTE and notes is None:
                if h.filesz > MAX_NOTES:
                    raise InputError(f"{self.path}: a note segment of {h.filesz} bytes: more than kcore writes")
                notes = self._pread(h.filesz, h.offset)
            elif h.type == PT_LOAD and h.memsz:
                segments.append(KcoreSegment(h.vaddr, h.paddr, h.offset, min(h.filesz, h.memsz)))
        if not segments:
            raise InputError(f"{self.path}: no PT_LOAD segment: not a kcore, which maps at least the kernel text")
        found = CoreNotes()
        found.add(notes or b"", self.path)
        return tuple(segments), found.vmcoreinfo_text

    def _index_physical(self) -> None:
        """Sorted, disjoint physical frame ranges and the file offset of each one's first frame.

        KCORE_TEXT repeats part of a KCORE_RAM range (the kernel image is RAM
        too): the same frames, so the first segment by address wins."""
        lo, hi, offsets = [], [], []
        covered = 0
        for s in sorted((s for s in self.segments if s.paddr != NO_PADDR), key=lambda s: s.paddr):
            first = max(-(-s.paddr // PAGE_SIZE), covered)
            last = min(s.paddr + s.size, 1 << 64) // PAGE_SIZE
            if last <= first:
                continue
            lo.append(first)
            hi.append(last)
            offsets.append(s.offset + (first * PAGE_SIZE - s.paddr))
            covered = last
        self._lo = np.array(lo, dtype=np.uint64)
        self._hi = np.array(hi, dtype=np.uint64)
        self._first_offset = offsets

    # -- PhysicalMemory -----------------------------------------------------------

    def _vmcoreinfo_in_memory(self) -> None:
        """Not searched for: a kernel before 4.19 is the only one without the
        note, and reading all of its RAM through kcore, a pread per frame,
        would take minutes (linux.live refuses such a kernel instead)."""
        return None

    @property
    def end(self) -> int:
        return int(self._hi[-1]) << PAGE_SHIFT if len(self._hi) else 0

    def read_frames(self, pfns: np.ndarray) -> np.ndarray:
        pfns = np.asarray(pfns, dtype=np.uint64)
        seg = self._segments_of_held(pfns)
        out = np.empty((len(pfns), 512), dtype=ENTRY_DTYPE)
        for row, (pfn, s) in enumerate(zip(pfns.tolist(), seg.tolist())):
            offset = self._first_offset[s] + ((pfn - int(self._lo[s])) << PAGE_SHIFT)
            data = self._pread(PAGE_SIZE, offset)
            if len(data) != PAGE_SIZE:
                raise InputError(f"{self.path}: frame at pa {pfn << PAGE_SHIFT:#x} (file offset {offset:#x}) "
                                 f"read {len(data)} of {PAGE_SIZE} bytes")
            out[row] = np.frombuffer(data, dtype=ENTRY_DTYPE)
        return out

    # -- lifetime -----------------------------------------------------------------

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __repr__(self) -> str:
        return f"Kcore({self.path!r}, {len(self.segments)} segments, {len(self._lo)} physical ranges)"

