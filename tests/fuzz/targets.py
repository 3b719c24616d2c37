"""Fuzz targets and their input strategies, shared by the CI fuzz tests and bench/fuzz_long.py.

A target takes one generated input and exercises one reader; it may raise
:class:`ptilab.errors.PtilabError` (the input was refused, with a message) and
nothing else: any other exception is a crash. Targets also check the few
invariants a result must keep whatever the input (ranges sorted and disjoint).

Inputs start from real bytes where real bytes exist: the Debian 6.1 fixture's
user page tables (tests/realkernel/out/pti-4level) and a small core written by
:func:`ptilab.memory.elfwrite.write_elf_core`.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

from ptilab.errors import PtilabError
from ptilab.formats.ptdump import format_walk, linux_markers, parse_ptdump
from ptilab.formats.qemu import format_info_mem, parse_info_mem, parse_info_tlb
from ptilab.memory.elfcore import ElfCore
from ptilab.memory.elfwrite import qemu_cpu_note, write_elf_core
from ptilab.memory.images import open_image
from ptilab.memory.simulated import SimulatedRAM
from ptilab.paging import Geometry, walk
from ptilab.paging import entry as e
from tests.memory.dumpfiles import flatten, kdump_bytes, lime_bytes

FIXTURE = Path(__file__).resolve().parents[1] / "realkernel" / "out" / "pti-4level"
MAX_ENTRIES = 1 << 22  # a mutated tree may alias itself: bound the expansion
RAM_SIZE = 256 << 20


class Crash(AssertionError):
    """A target failed an invariant (as opposed to raising a non-ptilab exception)."""


# -- the small valid core ---------------------------------------------------------

@lru_cache(maxsize=1)
def small_core() -> bytes:
    """A core with two segments (one sparse), a 4-level tree mapping a few
    pages and one 2 MiB page, and two QEMU CPU notes."""
    pgd, pud, pmd, pt = 0x1000, 0x2000, 0x3000, 0x4000
    tables = {pgd: {0: pud | 0x67, 511: pud | 0x63}, pud: {0: pmd | 0x67, 510: pmd | 0x63},
              pmd: {0: pt | 0x67, 1: 0x200000 | 0xE3}, pt: {i: (0x10000 + i * 0x1000) | 0x65 for i in range(8)}}
    pages = []
    for pa, entries in tables.items():
        frame = np.zeros(512, np.uint64)
        for i, v in entries.items():
            frame[i] = v
        pages.append((pa, frame))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "small.elf"
        write_elf_core(path, [(0, 0x8000), (0x100000, 0x300000, 0x400000)],
                       notes=[qemu_cpu_note(cr3=pgd), qemu_cpu_note(cr3=pgd, cs=0x33)], pages=pages)
        return path.read_bytes()


HEADER_FIELDS = {  # name: (offset, struct format) in the ELF header / first program headers
    "e_phoff": (32, "<Q"), "e_shoff": (40, "<Q"), "e_ehsize": (52, "<H"), "e_phentsize": (54, "<H"),
    "e_phnum": (56, "<H"), "e_shentsize": (58, "<H"), "e_shnum": (60, "<H"), "e_shstrndx": (62, "<H"),
    "e_type": (16, "<H"), "e_machine": (18, "<H"), "ei_class": (4, "<B"), "ei_data": (5, "<B"),
}
for _i in range(3):
    _base = 64 + 56 * _i
    for _name, _off, _fmt in (("p_type", 0, "<I"), ("p_offset", 8, "<Q"), ("p_paddr", 24, "<Q"),
                              ("p_filesz", 32, "<Q"), ("p_memsz", 40, "<Q")):
        HEADER_FIELDS[f"ph{_i}.{_name}"] = (_base + _off, _fmt)

INTERESTING = [0, 1, 2, 3, 4, 7, 8, 0x38, 0x40, 0x1000, 0xFFF, 0x7FFF, 0xFFFF, 0x7FFF_FFFF, 0xFFFF_FFFF,
               0x1_0000_0000, 1 << 52, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, (1 << 64) - 0x1000]


def _fit(value: int, fmt: str) -> int:
    return value & ((1 << (8 * struct.calcsize(fmt))) - 1)


@st.composite
def mutated_cores(draw) -> bytes:
    """The small core, truncated, with header fields set to odd values, or with bytes flipped."""
    data = bytearray(small_core())
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["field", "flip", "truncate", "note"]))
        if kind == "field":
            name = draw(st.sampled_from(sorted(HEADER_FIELDS)))
            off, fmt = HEADER_FIELDS[name]
            value = draw(st.one_of(st.sampled_from(INTERESTING), st.integers(0, (1 << 64) - 1)))
            if off + struct.calcsize(fmt) <= len(data):
                struct.pack_into(fmt, data, off, _fit(value, fmt))
        elif kind == "flip" and data:
            # Mostly the headers and notes, sometimes the tables.
            limit = draw(st.sampled_from([0x400, len(data)]))
            at = draw(st.integers(0, min(limit, len(data)) - 1))
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "note":
            # The note segment follows the headers: namesz/descsz/type words.
            at = 64 + 56 * 3 + 4 * draw(st.integers(0, 5))
            if at + 4 <= len(data):
                struct.pack_into("<I", data, at, _fit(draw(st.sampled_from(INTERESTING)), "<I"))
        else:
            del data[draw(st.integers(0, len(data))):]
    return bytes(data)


def fuzz_core(data: bytes) -> None:
    """Open a (mutated) core, read every CPU's tree and a few frames through it."""
    fd, path = tempfile.mkstemp(suffix=".elf", prefix="ptilab-fuzz-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            mem = open_image(path)
        except PtilabError:
            return
        try:
            pfns = np.array([0, 1, 2, 7, 8, 0x100, 0x3FF, 0x400, 0x4FF, 0x500, 1 << 40], np.uint64)
            present = mem.frames_present(pfns)
            if len(pfns[present]):
                rows = mem.read_frames(pfns[present])
                if rows.shape != (int(present.sum()), 512):
                    raise Crash(f"read_frames gave shape {rows.shape}")
            for cpu in getattr(mem, "cpus", ()):
                try:
                    _check(walk(mem, cpu.cr3_register, cpu.geometry, max_entries=MAX_ENTRIES))
                except PtilabError:
                    pass
            for pa in (0, 0x1000, 0x7FF8, 0x100000, 0x3FFFF8, 0x4FFFF8):
                try:
                    mem.read_entry(pa)
                except PtilabError:
                    pass
        finally:
            if isinstance(mem, ElfCore) or hasattr(mem, "close"):
                mem.close()
    finally:
        os.unlink(path)


# -- the real user tree, mutated ------------------------------------------------------

@lru_cache(maxsize=1)
def real_tables() -> tuple[int, int, dict[int, np.ndarray]]:
    """(user CR3, kernel CR3, {pfn: table}) for every table of both views of the
    real fixture's user CPU (a few hundred frames)."""
    meta = json.loads((FIXTURE / "meta.json").read_text())
    user_cr3 = meta["cpus"][meta["user_cpu"]]["cr3"] & ~0xFFF
    kernel_cr3 = user_cr3 & ~0x1000
    mem = open_image(FIXTURE / "core.elf")
    try:
        frames: dict[int, np.ndarray] = {}
        for cr3 in (user_cr3, kernel_cr3):
            pfns = walk(mem, cr3, Geometry(4)).all_table_frames()
            for pfn, row in zip(pfns.tolist(), mem.read_frames(pfns)):
                frames[pfn] = row.copy()
        return user_cr3, kernel_cr3, frames
    finally:
        mem.close()


def real_fixture_present() -> bool:
    return (FIXTURE / "meta.json").exists() and (FIXTURE / "core.elf").exists()


ENTRY_VALUES = st.one_of(
    st.integers(0, (1 << 64) - 1),
    st.sampled_from([0, e.P, e.P | e.PS, (1 << 64) - 1, e.P | (1 << 51), e.P | (RAM_SIZE - 0x1000),
                     e.P | RAM_SIZE, e.P | (1 << 40), e.P | e.RW | e.US | 0x1000]),
)


@st.composite
def table_mutations(draw) -> tuple[bool, bool, bool, list[tuple[int, int, str, int]]]:
    """(walk the user view?, keep the ESPfix slot?, print and parse the result?,
    [(table number, entry index, how, value)]): each mutation picks one of the
    real tables by its rank, and an entry in it.

    The ESPfix slot maps one page 65536 times, which makes a walk ten times
    slower; most inputs drop it (clear PGD slot 510) so the budget goes on
    more inputs, a fifth keep it."""
    user_view = draw(st.booleans())
    keep_espfix = draw(st.integers(0, 4)) == 0
    printed = draw(st.integers(0, 3)) == 0
    muts = []
    for _ in range(draw(st.integers(1, 8))):
        how = draw(st.sampled_from(["set", "flip", "point-at-table", "toggle-ps", "clear"]))
        table = draw(st.integers(0, 1 << 16))
        index = draw(st.one_of(st.integers(0, 511), st.sampled_from([0, 1, 255, 256, 273, 508, 510, 511])))
        value = draw(ENTRY_VALUES) if how == "set" else draw(st.integers(0, 1 << 16)) if how == "point-at-table" \
            else draw(st.integers(0, 63))
        muts.append((table, index, how, value))
    return user_view, keep_espfix, printed, muts


ESPFIX_PGD_SLOT = 510


def mutated_ram(user_view: bool, keep_espfix: bool, muts) -> tuple[SimulatedRAM, int]:
    user_cr3, kernel_cr3, frames = real_tables()
    cr3 = user_cr3 if user_view else kernel_cr3
    pfns = sorted(frames)
    # The view's own PGD first, so small table numbers hit the top of the tree.
    pfns.remove(cr3 >> 12)
    pfns.insert(0, cr3 >> 12)
    edited = {}
    if not keep_espfix:
        edited[pfns[0]] = frames[pfns[0]].copy()
        edited[pfns[0]][ESPFIX_PGD_SLOT] = 0
    for table, index, how, value in muts:
        pfn = pfns[table % len(pfns)]
        row = edited.setdefault(pfn, frames[pfn].copy())
        old = int(row[index])
        if how == "set":
            new = value
        elif how == "flip":
            new = old ^ (1 << value)
        elif how == "point-at-table":
            new = (old & ~0x000F_FFFF_FFFF_F000 | (pfns[value % len(pfns)] << 12) | e.P) & ~e.PS
        elif how == "toggle-ps":
            new = old ^ e.PS
        else:
            new = 0
        row[index] = np.uint64(new & ((1 << 64) - 1))
    ram = SimulatedRAM(RAM_SIZE)
    for pfn in pfns:
        ram.write_entries(pfn << 12, edited.get(pfn, frames[pfn]))
    return ram, cr3


def _check(w) -> None:
    r = w.ranges
    if len(r) < 2:
        return
    va = r["va"]
    if (r["size"] == 0).any():
        raise Crash("a range of size 0")
    # Sorted in raw (pre-sign-extension) order is sorted in canonical order too.
    ends = va[:-1] + r["size"][:-1]
    if not (va[1:] >= ends).all():
        at = int(np.flatnonzero(va[1:] < ends)[0])
        raise Crash(f"ranges overlap or are unsorted at {int(va[at]):#x}+{int(r['size'][at]):#x} / {int(va[at + 1]):#x}")


def _check_against_reference(ram, cr3: int, w) -> None:
    """Summarising aliases must not change the answer: the plain walk (each
    alias expanded in place) gives the same ranges, references and anomalies,
    and the non-expanding views of the walk agree with its expansion."""
    try:
        ref = walk(ram, cr3, Geometry(4), max_entries=MAX_ENTRIES, _summarise=False)
    except PtilabError:
        return  # the plain walk's budget is smaller than the summarised one's
    if not np.array_equal(w.ranges, ref.ranges):
        raise Crash(f"summarised walk expands to {len(w.ranges)} ranges, the plain walk has {len(ref.ranges)}")
    if [t.tolist() for t in w.table_refs] != [t.tolist() for t in ref.table_refs]:
        raise Crash("table_refs differ from the plain walk's")
    if [(a.kind, a.level, a.count) for a in w.anomalies] != [(a.kind, a.level, a.count) for a in ref.anomalies]:
        raise Crash(f"anomalies differ: {w.anomalies} / {ref.anomalies}")
    present = (ref.ranges["prot"] & np.uint64(e.P)) != 0
    if w.mapped_bytes() != int(ref.ranges["size"][present].sum()):
        raise Crash("mapped_bytes() differs from the expansion's")
    if int(w.runs()["size"].sum()) != int(ref.ranges["size"].sum()):
        raise Crash("runs() cover a different amount of address space than the ranges")


def fuzz_walk(user_view: bool, keep_espfix: bool, printed: bool, muts) -> None:
    """Walk the real tree with entries mutated, then (if printed) print it as
    ptdump and as `info mem` and read both back."""
    ram, cr3 = mutated_ram(user_view, keep_espfix, muts)
    try:
        w = walk(ram, cr3, Geometry(4), max_entries=MAX_ENTRIES)
        # The walk summarises aliases; expanding them has the same budget.
        w.ranges
    except PtilabError:
        return
    _check(w)
    _check_against_reference(ram, cr3, w)
    if not printed:
        return
    text = format_info_mem(w)
    if text:
        parse_info_mem(text)
    # ptdump's text of a 16-line-capped tree: parsing must take it back.
    parse_ptdump(format_walk(w, linux_markers(w.geometry)))


# -- text parsers ------------------------------------------------------------------------

@lru_cache(maxsize=1)
def real_texts() -> dict[str, list[str]]:
    """Lines to mutate: the fixture's own `info mem`/`info tlb` heads and ptilab's ptdump of the user view."""
    out = {}
    for kind in ("info_mem", "info_tlb"):
        with open(FIXTURE / f"cpu0.{kind}.txt") as f:
            out[kind] = [next(f) for _ in range(200)]
    ram, cr3 = mutated_ram(True, True, [])
    w = walk(ram, cr3, Geometry(4))
    out["ptdump"] = format_walk(w, linux_markers(w.geometry)).splitlines(keepends=True)
    return out


PARSERS = {"info_mem": parse_info_mem, "info_tlb": parse_info_tlb, "ptdump": parse_ptdump}


@st.composite
def mutated_texts(draw) -> tuple[str, str]:
    kind = draw(st.sampled_from(sorted(PARSERS)))
    lines = real_texts()[kind]
    start = draw(st.integers(0, len(lines) - 1))
    chunk = list(lines[start:start + draw(st.integers(1, 20))])
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, len(chunk) - 1))
        line = chunk[i]
        how = draw(st.sampled_from(["replace", "insert", "delete", "truncate", "garbage-line"]))
        at = draw(st.integers(0, len(line)))
        ch = draw(st.sampled_from(list("0123456789abcdefxgGKMUSRW -[]\t\n\x00\u00e9") + [""]))
        if how == "replace":
            line = line[:at] + ch + line[at + 1:]
        elif how == "insert":
            line = line[:at] + ch + line[at:]
        elif how == "delete":
            line = line[:at] + line[at + 1:]
        elif how == "truncate":
            line = line[:at]
        else:
            line = draw(st.text(max_size=80)) + "\n"
        chunk[i] = line
    return kind, "".join(chunk)


def fuzz_text(kind: str, text: str) -> None:
    try:
        PARSERS[kind](text)
    except PtilabError:
        pass


# -- kdump-compressed and LiME files of the small core's memory ---------------------------

@lru_cache(maxsize=1)
def small_frames() -> dict[int, bytes]:
    """The small core's non-zero frames: its tables and a few data pages."""
    fd, path = tempfile.mkstemp(suffix=".elf")
    with os.fdopen(fd, "wb") as f:
        f.write(small_core())
    try:
        with ElfCore(path) as core:
            pfns = np.concatenate([np.arange(a >> 12, b >> 12, dtype=np.uint64) for a, b in core.segments])
            frames = core.read_frames(pfns)
            return {int(p): frames[i].tobytes() for i, p in enumerate(pfns) if frames[i].any() or p < 8}
    finally:
        os.unlink(path)


def small_kdump(compression: str = "zlib") -> bytes:
    """The small core as a kdump-compressed file (QEMU's CPU notes and a VMCOREINFO in its sub-header)."""
    return kdump_bytes(small_frames(), 0x500, compression=compression, existing=range(0x500),
                       notes=[qemu_cpu_note(cr3=0x1000), qemu_cpu_note(cr3=0x1000, cs=0x33)],
                       vmcoreinfo="OSRELEASE=6.1.0\nNUMBER(phys_base)=0\nSYMBOL(init_top_pgt)=ffffffff80001000\n")


# disk_dump_header fields and kdump_sub_header fields (at block 1): (offset, format)
KDUMP_FIELDS = {"header_version": (8, "<I"), "status": (424, "<I"), "block_size": (428, "<I"),
                "sub_hdr_size": (432, "<I"), "bitmap_blocks": (436, "<I"), "max_mapnr": (440, "<I"),
                "offset_vmcoreinfo": (4096 + 32, "<Q"), "size_vmcoreinfo": (4096 + 40, "<Q"),
                "offset_note": (4096 + 48, "<Q"), "size_note": (4096 + 56, "<Q"), "max_mapnr_64": (4096 + 104, "<Q")}


@st.composite
def mutated_kdumps(draw) -> bytes:
    """The small kdump file (any compression), its header fields, bitmaps,
    descriptors or pages damaged, cut short, maybe flattened afterwards."""
    data = bytearray(small_kdump(draw(st.sampled_from(["none", "zlib", "lzo", "snappy", "zstd"]))))
    sub_blocks, bitmap_blocks = struct.unpack_from("<II", data, 432)
    desc_at = (1 + sub_blocks + bitmap_blocks) * 4096
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["field", "bitmap", "descriptor", "page", "truncate"]))
        if kind == "field":
            off, fmt = KDUMP_FIELDS[draw(st.sampled_from(sorted(KDUMP_FIELDS)))]
            value = draw(st.one_of(st.sampled_from(INTERESTING), st.integers(0, (1 << 64) - 1)))
            if off + struct.calcsize(fmt) <= len(data):
                struct.pack_into(fmt, data, off, _fit(value, fmt))
        elif kind == "bitmap":
            at = (1 + sub_blocks) * 4096 + draw(st.integers(0, bitmap_blocks * 4096 - 1))
            if at < len(data):
                data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "descriptor":
            at = desc_at + 24 * draw(st.integers(0, 8)) + draw(st.sampled_from([0, 8, 12]))
            fmt = "<Q" if at % 24 == desc_at % 24 else "<I"
            if at + 8 <= len(data):
                struct.pack_into(fmt, data, at, _fit(draw(st.sampled_from(INTERESTING)), fmt))
        elif kind == "page" and len(data) > desc_at:
            at = draw(st.integers(desc_at, len(data) - 1))
            data[at] ^= 1 << draw(st.integers(0, 7))
        else:
            del data[draw(st.integers(0, len(data))):]
    if draw(st.booleans()):
        cut = draw(st.integers(0, 40))
        return flatten(bytes(data))[:-cut or None]
    return bytes(data)


def small_lime() -> bytes:
    """The small core's memory as a LiME file: one range per run of frames."""
    frames = small_frames()
    return lime_bytes([(pfn << 12, frames[pfn]) for pfn in sorted(frames)])


@st.composite
def mutated_limes(draw) -> bytes:
    """The small LiME file with range headers damaged, ranges repeated (overlap), flipped or cut."""
    data = bytearray(small_lime())
    headers = [i * (32 + 4096) for i in range(len(small_frames()))]
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["field", "repeat", "flip", "truncate"]))
        at = draw(st.sampled_from(headers))
        if kind == "field" and at + 32 <= len(data):
            off, fmt = draw(st.sampled_from([(0, "<I"), (4, "<I"), (8, "<Q"), (16, "<Q")]))
            struct.pack_into(fmt, data, at + off, _fit(draw(st.sampled_from(INTERESTING)), fmt))
        elif kind == "repeat":
            data += data[at:at + 32 + 4096]
        elif kind == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        else:
            del data[draw(st.integers(0, len(data))):]
    return bytes(data)


def fuzz_dump(data: bytes) -> None:
    """fuzz_core's reads, then a walk from the small core's PGD even when the
    file carries no CPU notes (LiME never does). A kdump file decompresses
    lazily, so a bad page is refused when it is read, not at open."""
    try:
        fuzz_core(data)
    except PtilabError:
        pass
    fd, path = tempfile.mkstemp(prefix="ptilab-fuzz-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            mem = open_image(path)
            _check(walk(mem, 0x1000, Geometry(4), max_entries=MAX_ENTRIES))
        except PtilabError:
            pass
    finally:
        os.unlink(path)


# -- the file readers: raw images, text files (ptdump, kallsyms, monitor text), workloads, VMCOREINFO ----

def _in_file(data: bytes, suffix: str):
    """A temporary file holding data, as a context manager giving its path."""
    from contextlib import contextmanager

    @contextmanager
    def made():
        fd, path = tempfile.mkstemp(suffix=suffix, prefix="ptilab-fuzz-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            yield path
        finally:
            os.unlink(path)
    return made()


@st.composite
def raw_images(draw) -> tuple[bytes, list[int]]:
    """A few frames: random bytes, or entries pointing at the image's own
    frames (loops, shared tables, large pages), and CR3 values to walk from."""
    frames = draw(st.integers(1, 6))
    data = bytearray()
    for _ in range(frames):
        if draw(st.booleans()):
            data += draw(st.binary(min_size=4096, max_size=4096))
        else:
            entries = draw(st.lists(st.tuples(st.integers(0, 511), st.integers(0, frames + 2), ENTRY_VALUES),
                                    max_size=12))
            frame = np.zeros(512, np.uint64)
            for index, target, flags in entries:
                frame[index] = np.uint64(((target << 12) | (flags & 0xFFF) | (flags & (1 << 63))) & ((1 << 64) - 1))
            data += frame.tobytes()
    if draw(st.booleans()):
        del data[draw(st.integers(0, len(data))):]
    cr3s = draw(st.lists(st.sampled_from([0, 0x1000, 0x2000, 0x5000, 0x1FFF, 1 << 40, (1 << 52) - 0x1000]),
                         min_size=1, max_size=3))
    return bytes(data), cr3s


def fuzz_raw(data: bytes, cr3s: list[int]) -> None:
    """Open bytes as a raw image and walk both paging modes from each CR3."""
    with _in_file(data, ".raw") as path:
        try:
            mem = open_image(path)
        except PtilabError:
            return
        try:
            for cr3 in cr3s:
                for levels in (4, 5):
                    try:
                        _check(walk(mem, cr3, Geometry(levels), max_entries=MAX_ENTRIES))
                    except PtilabError:
                        pass
        finally:
            mem.close()


KALLSYMS_SAMPLE = ("ffffffff81000000 T _text\nffffffff81e00000 T __entry_text_start\n"
                   "ffffffff81e02000 T __entry_text_end\nffffffff81e00990 T asm_exc_divide_error\n"
                   "ffffffffc0000000 t helper\t[mod]\n0000000000000000 A fixed_percpu_data\n")


@st.composite
def mutated_files(draw) -> tuple[str, bytes]:
    """(reader, file bytes): real or sample text with characters replaced,
    inserted or cut, sometimes raw bytes after it or instead of it."""
    reader = draw(st.sampled_from(sorted(FILE_READERS)))
    if reader == "kallsyms":
        text = KALLSYMS_SAMPLE
    else:
        text = "".join(real_texts()[reader][:draw(st.integers(1, 30))])
    data = bytearray(text.encode())
    for _ in range(draw(st.integers(0, 6))):
        how = draw(st.sampled_from(["replace", "insert", "cut", "binary", "long-line"]))
        at = draw(st.integers(0, len(data)))
        if how == "replace" and at < len(data):
            data[at] = draw(st.sampled_from(list(b"0123456789abcdefxT -[]\t\n\x00\x1b\xff")))
        elif how == "insert":
            data[at:at] = draw(st.binary(max_size=8))
        elif how == "cut":
            del data[at:]
        elif how == "binary":
            data[at:at] = draw(st.binary(min_size=1, max_size=2048))
        else:
            data[at:at] = b"x" * draw(st.sampled_from([4095, 4096, 4097, 9000]))
    return reader, bytes(data)


def _read_kallsyms(path: str) -> None:
    from ptilab.formats.kallsyms import USED, read_symbols
    whole = read_symbols(path)
    if {k: v for k, v in whole.items() if k in USED} != read_symbols(path, USED):
        raise Crash("the symbols kept when asked for USED differ from the whole table's")


def _file_readers() -> dict:
    from ptilab.formats.ptdump import read_ptdump
    from ptilab.formats.qemu import read_info_mem, read_info_tlb
    return {"ptdump": read_ptdump, "info_mem": read_info_mem, "info_tlb": read_info_tlb, "kallsyms": _read_kallsyms}


FILE_READERS = _file_readers()


def fuzz_file(reader: str, data: bytes) -> None:
    """A text reader on a file: parsed, or one-line InputError."""
    with _in_file(data, ".txt") as path:
        try:
            FILE_READERS[reader](path)
        except PtilabError as err:
            if "\n" in str(err) or "\x1b" in str(err):
                raise Crash(f"a refusal of more than one clean line: {str(err)[:80]!r}")


@st.composite
def mutated_workloads(draw) -> bytes:
    """A shipped workload's TOML with values swapped for odd ones, keys
    renamed, lines dropped or bytes inserted."""
    from ptilab.mmu.workload import WORKLOAD_DIR, available
    lines = (WORKLOAD_DIR / f"{draw(st.sampled_from(available()))}.toml").read_text().splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 6))):
        i = draw(st.integers(0, len(lines) - 1))
        how = draw(st.sampled_from(["value", "key", "drop", "bytes", "dup"]))
        key, sep, _ = lines[i].partition("=")
        if how == "value" and sep:
            value = draw(st.sampled_from(['"many"', "-3", "0", "1000000000", "true", "1.5", "[]", '"idt+0x1' + "0" * 16
                                          + '"', '"idt+\u0663"', '"lstar+0xffffffff"', str(1 << 70), '"top"',
                                          '"kernel_stack.top-0x100000"', "4096", "-4096", '["linux-9"]']))
            lines[i] = f"{key}= {value}\n"
        elif how == "key" and sep:
            lines[i] = draw(st.sampled_from(["when", "count", "processes", "to", "of", "do"])) + " =" + lines[i][
                len(key) + 1:]
        elif how == "drop":
            del lines[i]
            if not lines:
                lines = ["\n"]
        elif how == "dup":
            lines[i:i] = [lines[i]] * draw(st.integers(1, 3))
        else:
            lines[i] = draw(st.binary(max_size=20)).decode("latin-1") + lines[i]
    return "".join(lines).encode("utf-8", "surrogatepass")


def fuzz_workload(data: bytes) -> None:
    """Load a workload file and resolve and play its steps on a small kernel."""
    from ptilab.mmu.cost import measure
    from ptilab.mmu.workload import load

    with _in_file(data, ".toml") as path:
        try:
            w = load(path)
        except PtilabError:
            return
        if sum(s.count for s in w.steps) > 2000:
            return  # valid and only slow: the schema's bound is MAX_ACCESSES
        from ptilab.pti import boot
        try:  # a fresh kernel each time (3 ms): measure() spawns the workload's processes in it
            measure(boot("linux-6.1", "linux", cpus=2), path, pcid=True)
        except PtilabError:
            pass


@st.composite
def vmcoreinfo_texts(draw) -> bytes:
    keys = ["OSRELEASE", "KERNELOFFSET", "NUMBER(phys_base)", "NUMBER(pgtable_l5_enabled)", "SYMBOL(init_top_pgt)",
            "SYMBOL(_stext)", "PAGESIZE", "CRASHTIME"]
    values = st.one_of(st.sampled_from(["0", "-1", "1000000", "ffffffff82a0c000", "0x1000", "", "zz", "1" * 30,
                                        str(-(1 << 64)), "6.1.0-13-amd64"]), st.text(max_size=20))
    lines = draw(st.lists(st.tuples(st.sampled_from(keys), values), max_size=10))
    text = "".join(f"{k}={v}\n" for k, v in lines).encode("utf-8", "surrogatepass")
    return text + draw(st.sampled_from([b"", b"\0\0\0", b"\xff\xfe"]))


def fuzz_vmcoreinfo(data: bytes) -> None:
    from ptilab.memory.vmcoreinfo import parse_vmcoreinfo, pgd_pair
    try:
        info = parse_vmcoreinfo(data)
        if "init_top_pgt" in info.symbols:
            pgd_pair(info)
    except PtilabError:
        pass


@st.composite
def vmcoreinfo_pages(draw) -> tuple[int, list[tuple[int, str, bytes]]]:
    """Hostile pages for the search of VMCOREINFO in RAM (memory.vmcoreinfo.find_vmcoreinfo):
    a model machine's slide, and copies of its real text, mutated (lines dropped, values
    swapped for odd ones, bytes flipped, cut short), each written as a data page or as a
    note with any n_descsz, anywhere (the last frame too, so a note's text may run out of RAM)."""
    from tests.memory.kernel_image import RAM, machine

    offset = draw(st.integers(0, 511)) * (2 << 20)
    text = machine(offset=offset)[1].encode()
    copies = []
    for _ in range(draw(st.integers(1, 4))):
        lines = text.splitlines(keepends=True)
        lines = draw(st.lists(st.sampled_from(lines), max_size=len(lines) + 2)) if draw(st.booleans()) else lines
        data = bytearray(b"".join(lines))
        for _ in range(draw(st.integers(0, 3))):
            kind = draw(st.sampled_from(["value", "flip", "cut"]))
            if kind == "value" and data:
                key = draw(st.sampled_from([b"KERNELOFFSET=", b"NUMBER(phys_base)=", b"SYMBOL(init_top_pgt)=",
                                            b"SYMBOL(_stext)=", b"PAGESIZE=", b"NUMBER(pgtable_l5_enabled)="]))
                value = draw(st.sampled_from([b"0", b"-1", b"ffffffffffffffff", b"1" * 30, b"zz", b"",
                                              b"ffffffff80000000", b"8000000000000000", b"4096"]))
                data = bytearray(bytes(data).replace(key, key + value + b"\n" + key, 1))
            elif kind == "flip" and data:
                data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
            elif data:
                del data[draw(st.integers(0, len(data))):]
        where = draw(st.one_of(st.integers(0x100, 0x3FF), st.just(RAM // e.PAGE_SIZE - 1))) << e.PAGE_SHIFT
        form = draw(st.sampled_from(["data", "note"]))
        descsz = draw(st.one_of(st.just(len(data)), st.integers(0, (1 << 32) - 1)))
        copies.append((where, form, bytes(data) if form == "data" else _vmcoreinfo_note_with(bytes(data), descsz)))
    return offset, copies


def _vmcoreinfo_note_with(text: bytes, descsz: int) -> bytes:
    return struct.pack("<III", 11, descsz, 0) + b"VMCOREINFO\0\0" + text


def fuzz_vmcoreinfo_pages(value: tuple[int, list[tuple[int, str, bytes]]]) -> None:
    """Search the machine's RAM: nothing, or a VMCOREINFO its tables confirm, whose text is where it says."""
    from ptilab.memory.vmcoreinfo import confirmation_failure, find_vmcoreinfo
    from tests.memory.kernel_image import machine, write

    offset, copies = value
    ram, _ = machine(offset=offset)
    for pa, _form, data in copies:
        write(ram, pa, data[:2 * e.PAGE_SIZE])
    try:
        found = find_vmcoreinfo(ram)
    except PtilabError:
        return
    if found is None:
        return
    if confirmation_failure(ram, found) is not None:
        raise Crash(f"found a VMCOREINFO its tables refute: {confirmation_failure(ram, found)}")
    if not ram.read(found.found_at, 10) == b"OSRELEASE=":
        raise Crash(f"found_at {found.found_at:#x} does not hold the text")


# -- /proc/kcore ----------------------------------------------------------------------

@lru_cache(maxsize=1)
def small_kcore() -> bytes:
    """A kcore-shaped file (tests/memory/fake_kcore.py) over the small core's tables, with
    VMCOREINFO naming its PGD as init_top_pgt."""
    from tests.memory.fake_kcore import write_kcore

    core = small_core()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "small.elf"
        path.write_bytes(core)
        mem = open_image(path)
        frames = {pfn: mem.read_frame(pfn).tobytes() for pfn in (1, 2, 3, 4)}
        mem.close()
        info = "OSRELEASE=6.1.0\nSYMBOL(init_top_pgt)=ffffffff80001000\nNUMBER(phys_base)=0\nNUMBER(pgtable_l5_enabled)=0\n"
        write_kcore(Path(tmp) / "kcore", [(0, 0x8000), (0x100000, 0x300000)], frames, info)
        return (Path(tmp) / "kcore").read_bytes()


KCORE_FIELDS = dict(HEADER_FIELDS, **{f"ph{i}.p_vaddr": (64 + 56 * i + 16, "<Q") for i in range(3)})


@st.composite
def mutated_kcores(draw) -> bytes:
    """The small kcore with header and program-header fields set to odd values, bytes flipped
    (headers, notes, VMCOREINFO text) or the file cut short."""
    data = bytearray(small_kcore())
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["field", "flip", "truncate"]))
        if kind == "field":
            off, fmt = KCORE_FIELDS[draw(st.sampled_from(sorted(KCORE_FIELDS)))]
            value = draw(st.one_of(st.sampled_from(INTERESTING), st.integers(0, (1 << 64) - 1)))
            if off + struct.calcsize(fmt) <= len(data):
                struct.pack_into(fmt, data, off, _fit(value, fmt))
        elif kind == "flip" and data:
            at = draw(st.integers(0, min(draw(st.sampled_from([0x1000, len(data)])), len(data)) - 1))
            data[at] ^= 1 << draw(st.integers(0, 7))
        else:
            del data[draw(st.integers(0, len(data))):]
    return bytes(data)


def fuzz_kcore(data: bytes) -> None:
    """Open a (mutated) kcore, find init_top_pgt from its VMCOREINFO and walk it."""
    from ptilab.memory.kcore import Kcore
    from ptilab.memory.vmcoreinfo import parse_vmcoreinfo

    fd, path = tempfile.mkstemp(prefix="ptilab-fuzz-kcore-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            kcore = Kcore(path)
        except PtilabError:
            return
        try:
            pfns = np.array([0, 1, 4, 7, 8, 0x100, 0x3FF, 0x400, 1 << 40], np.uint64)
            present = kcore.frames_present(pfns)
            try:
                rows = kcore.read_frames(pfns[present])
                if rows.shape != (int(present.sum()), 512):
                    raise Crash(f"read_frames gave shape {rows.shape}")
                info = kcore.vmcoreinfo or parse_vmcoreinfo("")
                _check(walk(kcore, info.kernel_pgd, Geometry(info.levels), max_entries=MAX_ENTRIES))
            except PtilabError:
                pass
        finally:
            kcore.close()
    finally:
        os.unlink(path)


# -- the printk ring ------------------------------------------------------------------

RING_PARTS = {"header": 88, "descs": 16 * 24, "infos": 16 * 88, "data": 512}
RING_FORMATS = ["<Q", "<I", "<H", "<B"]
RING_VALUES = INTERESTING + [0x1 << 62, 0x2 << 62, 0x3 << 62, 0x3, 60, 28, 31, 32, 0xFFFF_8880_0000_0000]


@st.composite
def ring_mutations(draw) -> tuple[list[tuple[str, int, str, int]], list[tuple[str, str | None]]]:
    """(writes into a small ring written as printk writes it (tests/linux/printk_ring.py),
    VMCOREINFO entries changed or dropped): descriptors with garbage state, ids out of
    range, lpos past the ring, count_bits of 60, pointers anywhere."""
    from tests.linux.printk_ring import LAYOUT

    writes = []
    for _ in range(draw(st.integers(0, 6))):
        part = draw(st.sampled_from(sorted(RING_PARTS)))
        fmt = draw(st.sampled_from(RING_FORMATS))
        at = draw(st.integers(0, RING_PARTS[part] - struct.calcsize(fmt)))
        if draw(st.booleans()):
            at &= ~(struct.calcsize(fmt) - 1)  # a field's own alignment, most of the time
        value = draw(st.one_of(st.sampled_from(RING_VALUES), st.integers(0, (1 << 64) - 1)))
        writes.append((part, at, fmt, _fit(value, fmt)))
    keys = draw(st.lists(st.sampled_from(sorted(LAYOUT) + ["SYMBOL(prb)", "SYMBOL(init_top_pgt)"]), max_size=2))
    entries = [(k, draw(st.sampled_from([None, "0", "8", "88", "65535", "-1", "zz", "ffffffff81000040"])))
               for k in keys]
    return writes, entries


def fuzz_ring(mutation) -> None:
    """Read the log of a mutated ring: records that keep the ring's bounds, or a one-line refusal."""
    from ptilab.linux.printk import read_ring
    from ptilab.memory.vmcoreinfo import parse_vmcoreinfo
    from tests.linux.printk_ring import Message, build_ring

    writes, entries = mutation
    ring = build_ring([Message(b"message %d" % i + b" more" * (i % 5), ts_nsec=i * 10 ** 7) for i in range(40)])
    base = {"header": ring.prb, "descs": ring.descs, "infos": ring.infos, "data": ring.data}
    for part, at, fmt, value in writes:
        ring.poke(base[part] + at, fmt, value)
    text = ring.vmcoreinfo
    for key, value in entries:
        text = "".join(line + "\n" for line in text.splitlines() if not line.startswith(key + "="))
        if value is not None:
            text += f"{key}={value}\n"
    try:
        log = read_ring(ring.ram, parse_vmcoreinfo(text))
    except PtilabError as err:
        if "\n" in str(err):
            raise Crash(f"a refusal of more than one line: {err!r}")
        return
    if not log.records or log.skipped < 0 or len(log.records) + log.skipped > 1 << 28:
        raise Crash(f"{len(log.records)} records, {log.skipped} skipped")
    for r in log.records:
        if len(r.raw) > 0xFFFF or not 0 <= r.level <= 7:
            raise Crash(f"record {r!r} is not one the ring can hold")


# -- kernel images for ptilab boot: bzImage headers and Debian packages ------------------------


def small_bzimage() -> bytes:
    """A bzImage header (boot protocol: HdrS, boot_flag, setup_sects, syssize, kernel_version)
    and as many bytes as it announces."""
    head = bytearray(5 * 512 + 16 * 16)
    head[0x1F1] = 4
    struct.pack_into("<I", head, 0x1F4, 16)
    struct.pack_into("<H", head, 0x1FE, 0xAA55)
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", head, 0x20E, 0x300 - 0x200)
    head[0x300:0x310] = b"9.9.9-fuzz (me)\0"
    return bytes(head)


def _ar_member(name: bytes, body: bytes) -> bytes:
    head = name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) + b"0".ljust(6) + b"100644".ljust(8)
    return head + str(len(body)).encode().ljust(10) + b"`\n" + body + b"\n" * (len(body) % 2)


def small_deb(names: tuple[str, ...] = ("./boot/vmlinuz-9.9.9",
                                        "./lib/modules/9.9.9/kernel/drivers/firmware/qemu_fw_cfg.ko")) -> bytes:
    """A Debian package as dpkg-deb writes one (ar: debian-binary, control, data.tar.gz)."""
    import io
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name in names:
            body = small_bzimage() if "vmlinuz" in name else b"\x7fELF module"
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return b"!<arch>\n" + _ar_member(b"debian-binary", b"2.0\n") + _ar_member(b"control.tar.gz", b"") + \
        _ar_member(b"data.tar.gz", out.getvalue())


HOSTILE_MEMBERS = ["/boot/vmlinuz-9.9.9", "../boot/vmlinuz-9.9.9", "boot/../../vmlinuz-9.9.9",
                   "./usr/lib/modules/9.9.9/vmlinuz", "boot/vmlinuz-", "lib/modules/x/kernel/../qemu_fw_cfg.ko"]


@st.composite
def kernel_files(draw) -> bytes:
    """The small bzImage or .deb: header bytes set to odd values, flipped, cut, or members renamed."""
    if draw(st.booleans()):
        data = bytearray(small_bzimage())
        for _ in range(draw(st.integers(0, 4))):
            at = draw(st.sampled_from([0x1F1, 0x1F4, 0x1F5, 0x1FE, 0x202, 0x20E, 0x20F, 0x300]))
            data[at] = draw(st.integers(0, 255))
    else:
        names = draw(st.lists(st.sampled_from(HOSTILE_MEMBERS), max_size=2))
        data = bytearray(small_deb(("./boot/vmlinuz-9.9.9", *names)))
        for _ in range(draw(st.integers(0, 3))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[:draw(st.integers(0, len(data)))] if draw(st.booleans()) else data)


def fuzz_kernel_image(data: bytes) -> None:
    """guest.image.kernel_image(): a kernel to boot, or one-line InputError; never a file written
    outside the directory it unpacks into."""
    from ptilab.guest.image import kernel_image

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        given = root / "given"
        given.write_bytes(data)
        try:
            image = kernel_image(given, root / "unpack")
            if image.path != given and not image.path.is_relative_to(root / "unpack"):
                raise Crash(f"the kernel to boot is outside the unpack directory: {image.path}")
        except PtilabError as refused:
            if "\n" in str(refused):
                raise Crash(f"a refusal of more than one line: {refused}") from None
        written = [p for p in root.rglob("*") if p.is_file() and p != given]
        stray = [p for p in written if not p.is_relative_to(root / "unpack")]
        if stray:
            raise Crash(f"written outside the unpack directory: {stray}")


TARGETS = {  # name: (strategy, target taking the strategy's value)
    "core": (mutated_cores(), fuzz_core),
    "kcore": (mutated_kcores(), fuzz_kcore),
    "kdump": (mutated_kdumps(), fuzz_dump),
    "lime": (mutated_limes(), fuzz_dump),
    "walk": (table_mutations(), lambda m: fuzz_walk(*m)),
    "text": (mutated_texts(), lambda t: fuzz_text(*t)),
    "raw": (raw_images(), lambda r: fuzz_raw(*r)),
    "file": (mutated_files(), lambda f: fuzz_file(*f)),
    "workload": (mutated_workloads(), fuzz_workload),
    "vmcoreinfo": (vmcoreinfo_texts(), fuzz_vmcoreinfo),
    "ring": (ring_mutations(), fuzz_ring),
    "vmcoreinfo_pages": (vmcoreinfo_pages(), fuzz_vmcoreinfo_pages),
    "kernel_image": (kernel_files(), fuzz_kernel_image),
}
NEED_FIXTURE = ("walk", "text", "file")  # start from the real pti-4level fixture's tables and texts
