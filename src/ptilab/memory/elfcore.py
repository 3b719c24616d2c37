"""Guest physical memory from an ELF core: QEMU's ``dump-guest-memory``, kdump's vmcore.

Both write an ELF64 ``ET_CORE`` file whose ``PT_LOAD`` segments hold guest
physical memory: ``p_paddr`` is the guest physical address of the segment's
first byte. ``p_vaddr`` is a virtual address only in QEMU's paging mode
(``dump-guest-memory -p``); otherwise QEMU copies ``p_paddr`` into it, while
kdump writes the kernel's virtual address of the range. Only ``p_paddr`` is
used here. QEMU 7.2 also writes an (empty) section header table before the
program headers and a bogus ``e_ehsize`` of 8; neither matters for reading.

The file is memory-mapped, never read whole: a frame costs a page fault when a
walk first touches it, so a sparse 64 GiB core opens instantly and reads in
the few megabytes its page tables occupy.

QEMU also records each CPU's control registers in a note of its own (name
``"QEMU"``, type 0, ``struct QEMUCPUState`` in target/i386/arch_dump.c), so the
CR3 and CR4 of every CPU come with the core::

    >>> core = ElfCore("core.elf")
    >>> cpu = core.cpus[1]
    >>> walk(core, cpu.cr3_register, cpu.geometry)
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from ptilab.errors import InputError
from ptilab.memory.physical import BLOCK_FRAMES, ENTRY_DTYPE, SegmentedMemory, mapped_frame_blocks
from ptilab.paging.cr3 import CR3
from ptilab.paging.entry import PAGE_SHIFT, PAGE_SIZE
from ptilab.paging.geometry import Geometry

# struct QEMUCPUState (QEMUCPUSTATE_VERSION 1): u32 version, u32 size, 18 u64
# general registers ending with rip and rflags, ten 24-byte segment caches
# (cs first), then u64 cr[5]. Newer QEMUs append fields and raise size.
QEMU_NOTE_NAME = b"QEMU"
QEMU_NOTE_TYPE = 0
QEMU_CPU_STATE_VERSION = 1
QEMU_CPU_STATE_SIZE = 432
QEMU_OFF_RSP = 8 + 6 * 8
QEMU_OFF_RIP = 8 + 16 * 8
QEMU_OFF_RFLAGS = QEMU_OFF_RIP + 8
QEMU_OFF_CS = QEMU_OFF_RFLAGS + 8
QEMU_OFF_CR = QEMU_OFF_CS + 10 * 24

# ELF64 (the System V gABI, <elf.h>): Elf64_Ehdr and Elf64_Phdr, little-endian.
ELF_MAGIC = b"\x7fELF"
EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
SHDR_SIZE = 64
SHDR_INFO_AT = 44  # Elf64_Shdr.sh_info: section 0's holds e_phnum when that is PN_XNUM
ET_CORE, EM_X86_64, EV_CURRENT = 4, 62, 1
PT_LOAD, PT_NOTE = 1, 4
PN_XNUM = 0xFFFF
ET_NAMES = {0: "ET_NONE", 1: "ET_REL", 2: "ET_EXEC", 3: "ET_DYN"}
EM_NAMES = {3: "EM_386", 8: "EM_MIPS", 20: "EM_PPC", 21: "EM_PPC64", 22: "EM_S390", 40: "EM_ARM",
            183: "EM_AARCH64", 243: "EM_RISCV", 258: "EM_LOONGARCH"}
NT_PRSTATUS = 1  # struct elf_prstatus: one per CPU, in kdump's vmcore and QEMU's cores
CR4_LA57 = 1 << 12
CR4_PCIDE = 1 << 17

# QEMU writes p_offset = -1 (and p_filesz = 0) for a mapping whose memory it
# did not dump, e.g. outside the range given to dump-guest-memory.
NOT_DUMPED = (1 << 64) - 1


@dataclass(frozen=True)
class CpuState:
    """One CPU's registers at the time of the dump, from QEMU's per-CPU note.

    ``index`` counts CPUs in the order QEMU wrote them (its CPU index, 0 up).
    """

    index: int
    rip: int
    rsp: int
    rflags: int
    cs: int  # selector; its low two bits are the CPL
    cr0: int
    cr2: int
    cr3: int
    cr4: int

    @property
    def cpl(self) -> int:
        """Privilege level the CPU was running at: 3 is user mode."""
        return self.cs & 3

    @property
    def geometry(self) -> Geometry:
        """4-level paging, or 5-level when CR4.LA57 is set."""
        return Geometry(5 if self.cr4 & CR4_LA57 else 4)

    @property
    def cr3_register(self) -> CR3:
        """CR3 with its PCID meaning taken from CR4.PCIDE."""
        return CR3(self.cr3, bool(self.cr4 & CR4_PCIDE))


@dataclass
class CoreNotes:
    """What ELF notes say about a dump (an ELF core's PT_NOTE segments, or the
    notes a kdump-compressed file copies into its sub-header)."""

    cpus: list[CpuState] = field(default_factory=list)
    vmcoreinfo_text: str = ""
    prstatus_cpus: int = 0

    def add(self, blob: bytes, path: str) -> None:
        """Read one run of notes: Elf64_Nhdr, name and descriptor, each 4-byte aligned."""
        at = 0
        while at + 12 <= len(blob):
            namesz, descsz, ntype = struct.unpack_from("<III", blob, at)
            name_at = at + 12
            desc_at = name_at + _align4(namesz)
            at = desc_at + _align4(descsz)
            if at > len(blob):
                raise InputError(f"{path}: a note runs past the end of its note segment")
            name = blob[name_at:name_at + namesz].rstrip(b"\0")
            desc = blob[desc_at:desc_at + descsz]
            if name == QEMU_NOTE_NAME and ntype == QEMU_NOTE_TYPE:
                self.cpus.append(_qemu_cpu_state(len(self.cpus), desc, path))
            elif name == b"CORE" and ntype == NT_PRSTATUS:
                self.prstatus_cpus += 1
            elif name == b"VMCOREINFO":
                self.vmcoreinfo_text = desc.rstrip(b"\0").decode("ascii", "replace")


@dataclass(frozen=True)
class _Load:
    pa: int
    memsz: int
    offset: int
    filesz: int

    @property
    def end(self) -> int:
        return self.pa + self.memsz


@dataclass(frozen=True)
class ProgramHeader:
    """The fields of one Elf64_Phdr a core reader uses."""

    type: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int


def read_program_headers(pread: Callable[[int, int], bytes], size: int, path: str,
                         max_phnum: int | None = None) -> list[ProgramHeader]:
    """The program headers of an x86-64 ELF core of size bytes, read with
    pread(length, offset): Elf64_Ehdr checked (ELFCLASS64, little-endian,
    ET_CORE, EM_X86_64), the gABI's PN_XNUM extended numbering followed (QEMU's
    paging-mode cores of PTI kernels hold over 65 535), the table held inside
    the file and, with max_phnum, under that count."""
    header = pread(EHDR.size, 0)
    if len(header) < EHDR.size:
        raise InputError(f"{path}: {size} bytes, cut inside its ELF header ({EHDR.size} bytes): truncated")
    ident, e_type, e_machine, _v, _entry, phoff, shoff, _flags, _ehsize, phentsize, phnum, *_ = EHDR.unpack(header)
    if ident[:4] != ELF_MAGIC:
        raise InputError(f"{path}: not a readable ELF core: no ELF magic")
    if ident[4] not in (1, 2) or ident[5] not in (1, 2):  # ELFCLASS32/64, ELFDATA2LSB/MSB
        raise InputError(f"{path}: not a readable ELF core: e_ident's class and data bytes "
                         f"({ident[4]}, {ident[5]}) are none of ELF's")
    if ident[4] != 2 or ident[5] != 1:
        raise InputError(f"{path}: not an ELFCLASS64 little-endian core (x86-64 cores are)")
    if e_type != ET_CORE:
        raise InputError(f"{path}: an ELF {ET_NAMES.get(e_type, f'type {e_type}')} file, not a core (ET_CORE)")
    if e_machine != EM_X86_64:
        raise InputError(f"{path}: a core for {EM_NAMES.get(e_machine, f'machine {e_machine}')}, not x86-64")
    if phnum == PN_XNUM:
        # Section header 0's sh_info holds the real count.
        if shoff == 0 or shoff + SHDR_SIZE > size:
            raise InputError(f"{path}: e_phnum is PN_XNUM but section header 0 (at file offset {shoff:#x}) "
                             f"is not in the file ({size:#x} bytes): truncated")
        (phnum,) = struct.unpack("<I", pread(4, shoff + SHDR_INFO_AT))
    if phnum and phentsize != PHDR.size:
        raise InputError(f"{path}: not a readable ELF core: program headers of {phentsize} bytes "
                         f"(ELF64's are {PHDR.size})")
    if max_phnum is not None and phnum > max_phnum:
        raise InputError(f"{path}: {phnum} program headers: more than the {max_phnum} this kind of core holds")
    if phnum and phoff + phnum * phentsize > size:
        raise InputError(f"{path}: its program-header table ({phnum} entries at file offset "
                         f"{phoff:#x}) runs past the end of the file ({size:#x} bytes): truncated")
    table = pread(phnum * PHDR.size, phoff) if phnum else b""
    if len(table) < phnum * PHDR.size:
        raise InputError(f"{path}: program headers at {phoff:#x} run past the end of the file")
    return [ProgramHeader(p_type, offset, vaddr, paddr, filesz, memsz)
            for p_type, _f, offset, vaddr, paddr, filesz, memsz, _a in PHDR.iter_unpack(table)]


class ElfCore(SegmentedMemory):
    """Physical memory held in the ``PT_LOAD`` segments of an x86-64 ELF core.

    A frame is present when all 4096 bytes of it lie inside one segment's
    memory size; bytes past the segment's file size read as zeros, as the
    ELF specification says. Segments may overlap (QEMU's paging mode writes
    one per virtual mapping, so aliases repeat physical ranges); the first
    in address order wins.

    Attributes:
        path: the file.
        segments: the physical ranges held, as sorted, disjoint
            ``(pa_start, pa_end)`` pairs.
        cpus: one :class:`CpuState` per CPU when QEMU wrote its notes, else ().
        vmcoreinfo_text: the ``VMCOREINFO`` note's text (kdump writes it, and
            QEMU does when the guest has a vmcoreinfo device), else "";
            ``vmcoreinfo`` decodes it (PhysicalMemory).
        prstatus_cpus: how many ``NT_PRSTATUS`` notes (one per CPU) the core holds.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                loads, note_ranges = self._read_headers(f, size)
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except OSError as ex:
            raise InputError(f"{self.path}: cannot read: {ex.strerror or ex}") from None
        notes = CoreNotes()
        for offset, length in note_ranges:
            notes.add(self._bytes(offset, length), self.path)
        self.cpus = tuple(notes.cpus)
        self.vmcoreinfo_text = notes.vmcoreinfo_text
        self.prstatus_cpus = notes.prstatus_cpus
        self._refuse_differing_overlaps(loads)
        self._set_segments(_disjoint(loads))

    # -- reading the file ---------------------------------------------------

    def _read_headers(self, f, size: int) -> tuple[list[_Load], list[tuple[int, int]]]:
        loads, notes = [], []
        for h in read_program_headers(lambda n, at: os.pread(f.fileno(), n, at), size, self.path):
            if h.type == PT_NOTE:
                notes.append((h.offset, h.filesz))
            elif h.type == PT_LOAD and h.memsz and h.offset != NOT_DUMPED:
                loads.append(_Load(h.paddr, h.memsz, h.offset, min(h.filesz, h.memsz)))
        extents = [(f"the segment at pa {s.pa:#x}", s.offset + s.filesz) for s in loads]
        extents += [("the note segment", offset + length) for offset, length in notes]
        for what, end in extents:
            if end > size:
                raise InputError(f"{self.path}: {what} runs to file offset {end:#x}, past the end "
                                 f"of the file ({size:#x}): truncated")
        return loads, notes

    def _refuse_differing_overlaps(self, loads: list[_Load]) -> None:
        """Overlapping PT_LOADs are fine when they hold the same bytes (QEMU's
        paging mode repeats aliased physical ranges); if they differ, which
        one is the memory is anybody's guess: refused rather than a silent pick."""
        ordered = sorted(loads, key=lambda s: s.pa)
        for a, b in zip(ordered, ordered[1:]):
            lo, hi = b.pa, min(a.end, b.end)
            if lo >= hi:
                continue
            for at in range(lo, hi, 1 << 24):  # 16 MiB at a time: bounded memory
                end = min(hi, at + (1 << 24))
                if self._load_bytes(a, at, end) != self._load_bytes(b, at, end):
                    raise InputError(f"{self.path}: PT_LOAD segments at physical {a.pa:#x} and {b.pa:#x} overlap "
                                     f"with different contents (from {at:#x}): which one is memory is ambiguous")

    def _load_bytes(self, s: _Load, start: int, end: int) -> bytes:
        """Physical [start, end) of one segment: file bytes, then zeros past its file size."""
        skip = start - s.pa
        in_file = max(0, min(end - start, s.filesz - skip))
        return self._bytes(s.offset + skip, in_file) + bytes(end - start - in_file)

    def _bytes(self, offset: int, length: int) -> bytes:
        return bytes(self._mmap[offset:offset + length]) if self._mmap is not None and length else b""

    def _set_segments(self, loads: list[_Load]) -> None:
        # Per segment, frame-granular: the frames wholly inside it, how many
        # of them are wholly in the file, and how many bytes of the next one.
        lo, hi, in_file, first_off, tail = [], [], [], [], []
        for s in loads:
            first = -(-s.pa // PAGE_SIZE)
            last = s.end // PAGE_SIZE
            if last <= first:
                continue
            skip = first * PAGE_SIZE - s.pa
            file_bytes = max(0, s.filesz - skip)
            whole = min(file_bytes // PAGE_SIZE, last - first)
            lo.append(first)
            hi.append(last)
            in_file.append(whole)
            first_off.append(s.offset + skip)
            tail.append(file_bytes - whole * PAGE_SIZE if whole < last - first else 0)
        self.segments = [(s.pa, s.end) for s in loads]
        self._lo = np.array(lo, dtype=np.uint64)
        self._hi = np.array(hi, dtype=np.uint64)
        self._in_file = np.array(in_file, dtype=np.uint64)
        self._first_off = first_off
        self._tail = tail
        self._views: dict[int, np.ndarray] = {}

    def _view(self, seg: int) -> np.ndarray:
        """Segment seg's in-file frames as an (n, 512) array over the mapping.

        QEMU places segment data right after the notes, so file offsets are
        not 4 KiB (nor even 8-byte) aligned: numpy reads unaligned views
        correctly, only a little slower.
        """
        view = self._views.get(seg)
        if view is None:
            n = int(self._in_file[seg])
            view = np.ndarray((n, 512), dtype=ENTRY_DTYPE, buffer=self._mmap, offset=self._first_off[seg])
            self._views[seg] = view
        return view

    # -- PhysicalMemory -----------------------------------------------------

    @property
    def end(self) -> int:
        return max((end for _, end in self.segments), default=0)

    def file_runs(self) -> list[tuple[int, int, int]]:
        """(first frame number, frames, file offset) of the frames the file holds
        as they are; frames past a segment's file size (zeros) are not listed."""
        return [(int(lo), int(n), off) for lo, n, off in zip(self._lo, self._in_file, self._first_off) if n]

    def frame_blocks(self, frames: int = BLOCK_FRAMES) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The frames the file holds as they are (file_runs()), as views of the
        mapping; a segment's partial last frame and its zeros are left out."""
        if self._mmap is None:
            return iter(())
        return mapped_frame_blocks(self.path, self._mmap, self.file_runs(), frames)

    def read_frames(self, pfns: np.ndarray) -> np.ndarray:
        pfns = np.asarray(pfns, dtype=np.uint64)
        seg = self._segments_of_held(pfns)
        out = np.zeros((len(pfns), 512), dtype=ENTRY_DTYPE)
        order = np.argsort(seg, kind="stable")
        bounds = np.flatnonzero(np.diff(seg[order])) + 1
        for rows in np.split(order, bounds):
            if len(rows) == 0:
                continue
            s = int(seg[rows[0]])
            rel = pfns[rows] - self._lo[s]
            whole = rel < self._in_file[s]
            if whole.any():
                out[rows[whole]] = self._view(s)[rel[whole]]
            partial = rel == self._in_file[s]
            if self._tail[s] and partial.any():
                out[rows[partial]] = self._tail_frame(s)
        return out

    def _tail_frame(self, seg: int) -> np.ndarray:
        """The frame the file holds only the start of; the rest reads as zeros."""
        start = self._first_off[seg] + int(self._in_file[seg]) * PAGE_SIZE
        data = self._bytes(start, self._tail[seg]).ljust(PAGE_SIZE, b"\0")
        return np.frombuffer(data, dtype=ENTRY_DTYPE)

    # -- lifetime -----------------------------------------------------------

    def close(self) -> None:
        """Unmap the file; the views handed out by read_frames are copies and stay valid."""
        self._views.clear()
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None

    def __repr__(self) -> str:
        return f"ElfCore({self.path!r}, {len(self.segments)} segments, {len(self.cpus)} cpus)"


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _qemu_cpu_state(index: int, desc: bytes, path: str) -> CpuState:
    if len(desc) < QEMU_CPU_STATE_SIZE:
        raise InputError(f"{path}: QEMU CPU note {index} holds {len(desc)} bytes, "
                         f"fewer than QEMUCPUState's {QEMU_CPU_STATE_SIZE}")
    version, _ = struct.unpack_from("<II", desc, 0)
    if version != QEMU_CPU_STATE_VERSION:
        raise InputError(f"{path}: QEMU CPU note {index} has version {version}; "
                         f"only version {QEMU_CPU_STATE_VERSION} is known")
    (rsp,) = struct.unpack_from("<Q", desc, QEMU_OFF_RSP)
    rip, rflags = struct.unpack_from("<QQ", desc, QEMU_OFF_RIP)
    (cs,) = struct.unpack_from("<I", desc, QEMU_OFF_CS)
    cr0, _cr1, cr2, cr3, cr4 = struct.unpack_from("<5Q", desc, QEMU_OFF_CR)
    return CpuState(index, rip, rsp, rflags, cs, cr0, cr2, cr3, cr4)


def _disjoint(loads: list[_Load]) -> list[_Load]:
    """Sort segments by address, drop what earlier ones already cover, and join
    neighbours that continue each other in the file (QEMU's paging mode splits
    memory into one segment per virtual mapping)."""
    out: list[_Load] = []
    covered = 0
    for s in sorted(loads, key=lambda s: s.pa):
        if s.end <= covered:
            continue
        if s.pa < covered:
            cut = covered - s.pa
            s = _Load(covered, s.memsz - cut, s.offset + cut, max(0, s.filesz - cut))
        covered = s.end
        if out:
            p = out[-1]
            if p.end == s.pa and p.filesz == p.memsz and p.offset + p.filesz == s.offset:
                out[-1] = _Load(p.pa, p.memsz + s.memsz, p.offset, p.filesz + s.filesz)
                continue
        out.append(s)
    return out
