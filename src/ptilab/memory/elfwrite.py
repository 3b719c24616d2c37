"""Writing physical memory out as an ELF core shaped like QEMU's ``dump-guest-memory``.

The layout is QEMU's: ELF header, one ``PT_NOTE`` program header, the
``PT_LOAD`` headers, the notes, then each segment's bytes back to back. Like
QEMU, segment data starts right after the notes, at no particular alignment,
unless ``align`` asks for more. Segments given by length only are left as
holes in a sparse file, so a 64 GiB segment costs nothing on disk::

    >>> write_elf_core("ram.elf", [(0, 64 << 30)], pages=[(0x1000, pgd_bytes)],
    ...                notes=[qemu_cpu_note(cr3=0x1000)])

The model's RAM (or any memory) exported this way opens with
:class:`ptilab.memory.elfcore.ElfCore`, and gdb, crash and drgn read it too.
"""

from __future__ import annotations

import os
import struct
from typing import Iterable, Sequence, Union

import numpy as np

from ptilab.memory.elfcore import (EHDR, EM_X86_64, ET_CORE, EV_CURRENT, PHDR, PN_XNUM, PT_LOAD, PT_NOTE,
                                   QEMU_CPU_STATE_SIZE, QEMU_CPU_STATE_VERSION, QEMU_NOTE_NAME, QEMU_NOTE_TYPE,
                                   QEMU_OFF_CR, QEMU_OFF_CS, QEMU_OFF_RIP, QEMU_OFF_RSP)
from ptilab.memory.physical import PhysicalMemory

Data = Union[bytes, bytearray, memoryview, np.ndarray]
# (pa, data or length) or (pa, data or length, memsz): a segment at physical
# address pa; a length alone is a hole in the file that reads as zeros, and
# memsz beyond the data is memory the file does not hold (also zeros).
Segment = Union[tuple[int, Union[Data, int]], tuple[int, Union[Data, int], int]]
Note = tuple[bytes, int, bytes]  # (name without NUL, type, descriptor)

NHDR = struct.Struct("<III")


def qemu_cpu_note(*, cr0: int = 0x80050033, cr2: int = 0, cr3: int = 0, cr4: int = 0x6F0,
                  rip: int = 0, rsp: int = 0, rflags: int = 0x2, cs: int = 0x10) -> Note:
    """A ``"QEMU"`` note carrying one CPU's ``QEMUCPUState``, as QEMU writes one per CPU."""
    desc = bytearray(QEMU_CPU_STATE_SIZE)
    struct.pack_into("<II", desc, 0, QEMU_CPU_STATE_VERSION, QEMU_CPU_STATE_SIZE)
    struct.pack_into("<Q", desc, QEMU_OFF_RSP, rsp)
    struct.pack_into("<QQ", desc, QEMU_OFF_RIP, rip, rflags)
    struct.pack_into("<I", desc, QEMU_OFF_CS, cs)
    struct.pack_into("<5Q", desc, QEMU_OFF_CR, cr0, 0, cr2, cr3, cr4)
    return QEMU_NOTE_NAME, QEMU_NOTE_TYPE, bytes(desc)


def _note_bytes(notes: Iterable[Note]) -> bytes:
    out = bytearray()
    for name, ntype, desc in notes:
        name = name + b"\0"
        out += NHDR.pack(len(name), len(desc), ntype)
        out += name.ljust(-(-len(name) // 4) * 4, b"\0")
        out += desc.ljust(-(-len(desc) // 4) * 4, b"\0")
    return bytes(out)


def _as_bytes(data: Data) -> bytes | memoryview:
    if isinstance(data, np.ndarray):
        return memoryview(np.ascontiguousarray(data)).cast("B")
    return data


def write_elf_core(path: str | os.PathLike[str], segments: Sequence[Segment],
                   notes: Iterable[Note] = (), pages: Iterable[tuple[int, Data]] = (), *,
                   align: int = 1) -> list[int]:
    """Write an x86-64 ELF core whose PT_LOAD segments hold physical memory;
    returns the file offset of each segment's data.

    segments: ``(pa, data_or_length[, memsz])`` each; ``p_paddr`` and, as QEMU
        does outside paging mode, ``p_vaddr`` are pa.
    notes: ``(name, type, desc)`` each, e.g. from :func:`qemu_cpu_note`.
    pages: ``(pa, data)`` written afterwards into the file-backed part of the
        segment holding pa: how a sparse segment gets its few live frames.
    align: file alignment of each segment's data (QEMU uses none; 4096 gives
        page-aligned offsets, as the kernel's /proc/vmcore has them).
    """
    if len(segments) + 1 >= PN_XNUM:
        raise ValueError(f"{len(segments)} segments need the PN_XNUM extension, which this writer lacks")
    blob = _note_bytes(notes)
    phnum = len(segments) + 1
    at = EHDR.size + PHDR.size * phnum + len(blob)
    placed = []  # (pa, data or None, filesz, memsz, offset)
    for seg in segments:
        pa, body = seg[0], seg[1]
        data = None if isinstance(body, int) else _as_bytes(body)
        filesz = body if data is None else len(data)
        memsz = seg[2] if len(seg) > 2 else filesz
        if memsz < filesz:
            raise ValueError(f"segment at {pa:#x}: memsz {memsz:#x} < file size {filesz:#x}")
        at = -(-at // align) * align
        placed.append((pa, data, filesz, memsz, at))
        at += filesz
    ident = b"\x7fELF" + bytes([2, 1, EV_CURRENT]) + bytes(9)
    header = EHDR.pack(ident, ET_CORE, EM_X86_64, EV_CURRENT, 0, EHDR.size, 0, 0,
                       EHDR.size, PHDR.size, phnum, 0, 0, 0)
    phdrs = [PHDR.pack(PT_NOTE, 0, EHDR.size + PHDR.size * phnum, 0, 0, len(blob), len(blob), 0)]
    phdrs += [PHDR.pack(PT_LOAD, 0, off, pa, pa, filesz, memsz, 0) for pa, _, filesz, memsz, off in placed]
    with open(path, "wb") as f:
        f.write(header + b"".join(phdrs) + blob)
        for _, data, _, _, off in placed:
            if data is not None and len(data):
                f.seek(off)
                f.write(data)
        # Holes stay holes: extending the file by truncate allocates nothing.
        f.truncate(at)
        for pa, data in pages:
            data = _as_bytes(data)
            seg = next((p for p in placed if p[0] <= pa and pa + len(data) <= p[0] + p[2]), None)
            if seg is None:
                raise ValueError(f"page at {pa:#x} lies in no segment's file-backed part")
            f.seek(seg[4] + pa - seg[0])
            f.write(data)
    return [off for *_, off in placed]


def write_memory_core(path: str | os.PathLike[str], mem: PhysicalMemory, pfns: Iterable[int],
                      notes: Iterable[Note] = (), *, batch: int = 4096) -> None:
    """Export frames pfns of mem as a core with one sparse segment spanning
    ``[0, mem.end)``: the frames listed hold their contents, the rest reads
    as zeros. ``Walk.all_table_frames()`` lists what a walk needs."""
    pfns = np.unique(np.fromiter(pfns, dtype=np.uint64))
    (offset,) = write_elf_core(path, [(0, mem.end)], notes)
    with open(path, "r+b") as f:
        for start in range(0, len(pfns), batch):
            chunk = pfns[start:start + batch]
            frames = mem.read_frames(chunk)
            for pfn, frame in zip(chunk, frames):
                if frame.any():
                    f.seek(offset + (int(pfn) << 12))
                    f.write(frame.tobytes())
