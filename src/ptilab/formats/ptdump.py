"""Linux ptdump text (/sys/kernel/debug/page_tables/{kernel,current_kernel,current_user}), written and read.

The writer prints what Linux 6.1's arch/x86/mm/dump_pagetables.c prints over
the generic walker of mm/ptdump.c and mm/pagewalk.c, byte for byte:

- note_page() is called once per entry the walker visits (a leaf, a pte,
  or a hole); a run breaks when the entry's flags, its effective rights or
  its level change, or when the entry's address reaches the next address
  marker. Physical addresses play no part.
- One marker per call: a run crossing two markers advances one at the first
  entry past the first marker and the other at the entry after that, so the
  line that starts at a marker can be printed under the previous header.
- The ESPfix marker prints at most 16 lines, then `... N entries skipped ... `.
- The 16 top-level slots of the guard hole are never walked: the run before
  them goes on until the first entry after them.
- The last run is flushed by note_page(0, -1, 0): it ends at address 0.

Levels are Linux's pgd=0 .. pte=4 whatever the paging mode. A 6.1 kernel
built with CONFIG_X86_5LEVEL (Debian's) runs a 4-level machine with the p4d
folded at run time: pgd_none() is constant 0 then, so walk_pgd_range() never
reports a pgd hole; p4d_offset() hands back the PML4 entry itself, and an
empty PML4 slot is reported by walk_p4d_range() as a hole at real_depth(1),
which is 0 because PTRS_PER_P4D is 1 (mm/pagewalk.c: "if p4d is folded then
a missing entry found at level 1 (p4d) is actually at level 0 (pgd)"). So
the top level prints as `pgd` in both modes, `p4d` only with 5 levels; below
it, PDPT/PD/PT print as pud/pmd/pte in both modes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from ptilab.errors import InputError, UsageError
from ptilab.linux.memory_layout import NOKASLR_BASES
from ptilab.formats.textfile import lines_of, read_lines
from ptilab.paging import EFF_NX, EFF_RW, EFF_US, RANGE_DTYPE, Geometry, Walk
from ptilab.paging import entry as e

LEVEL_NAMES = ("pgd", "p4d", "pud", "pmd", "pte")
UNITS = "BKMGTPE"
NOT_PRESENT = " " * 30
U64 = (1 << 64) - 1

# What a 6.1 x86-64 config sets (Debian's): the nokaslr bases (linux.memory_layout), KERNEL_IMAGE_SIZE of 1 GiB
# (RANDOMIZE_BASE), and FIXADDR_START = FIXADDR_TOP 0xffffffffff7ff000
# minus 646 permanent fixmap pages (vsyscall slot 511, DBGP, EARLYCON, APIC,
# 128 IO-APICs, PARAVIRT_BOOTMAP for XEN_PV, two APEI GHES slots).
FIXADDR_START_DEBIAN_6_1 = 0xFFFF_FFFF_FF57_9000
ESPFIX_MAX_LINES = 16


@dataclass(frozen=True)
class Marker:
    """One of dump_pagetables.c's address_markers[]: a `---[ name ]---` header
    printed when the walk reaches start; max_lines caps the lines under it."""

    start: int
    name: str
    max_lines: int = 0


def LINUX_X86_64_MARKERS(geometry: Geometry, kaslr_bases: Mapping[str, int] | None = None, *,
                         fixaddr_start: int = FIXADDR_START_DEBIAN_6_1, espfix: bool = True) -> list[Marker]:
    """address_markers[] of x86-64 Linux 6.1 as Debian configures it
    (MODIFY_LDT_SYSCALL, X86_ESPFIX64 and EFI on; no KASAN, so no shadow
    markers). kaslr_bases overrides the randomised page_offset_base,
    vmalloc_base and vmemmap_base (CONFIG_RANDOMIZE_MEMORY); espfix=False is
    a kernel without CONFIG_X86_ESPFIX64, whose ESPFIX_START_NR marker is
    #ifdef'd out (Debian's cloud flavour)."""
    bases = dict(NOKASLR_BASES[geometry.levels])
    for name, value in (kaslr_bases or {}).items():
        if name not in bases:
            raise UsageError(f"unknown KASLR base {name!r}: expected one of {', '.join(bases)}")
        bases[name] = value
    top_shift = geometry.shift(0)
    markers = [
        Marker(0, "User Space"),
        Marker(1 << 63, "Kernel Space"),
        Marker((-240 << top_shift) & U64, "LDT remap"),  # LDT_PGD_ENTRY, in both modes since 4.20
        Marker(bases["page_offset_base"], "Low Kernel Mapping"),
        Marker(bases["vmalloc_base"], "vmalloc() Area"),
        Marker(bases["vmemmap_base"], "Vmemmap"),
        Marker((-4 << 39) & U64, "CPU entry Area"),  # CPU_ENTRY_AREA_PGD << P4D_SHIFT
        Marker((-2 << 39) & U64, "ESPfix Area", ESPFIX_MAX_LINES),
        Marker((-68 << 30) & U64, "EFI Runtime Services"),  # EFI_VA_END
        Marker(0xFFFF_FFFF_8000_0000, "High Kernel Mapping"),
        Marker(0xFFFF_FFFF_C000_0000, "Modules"),
        Marker(0xFFFF_FFFF_FF00_0000, "End Modules"),
        Marker(fixaddr_start, "Fixmap Area"),
    ]
    return [m for m in markers if espfix or m.name != "ESPfix Area"]


def linux_markers(geometry: Geometry, page_offset: int | None = None, vmalloc: int | None = None,
                  vmemmap: int | None = None, fixaddr_start: int = FIXADDR_START_DEBIAN_6_1,
                  espfix: bool = True) -> list[Marker]:
    """LINUX_X86_64_MARKERS with the three KASLR bases as keyword arguments."""
    given = {"page_offset_base": page_offset, "vmalloc_base": vmalloc, "vmemmap_base": vmemmap}
    return LINUX_X86_64_MARKERS(geometry, {k: v for k, v in given.items() if v is not None},
                                fixaddr_start=fixaddr_start, espfix=espfix)


def format_size(delta: int) -> str:
    """The `%9lu%c ` size column: shift by 10 while divisible by 1024 (and a unit is left)."""
    unit = 0
    while not delta & 1023 and unit < len(UNITS) - 1:
        delta >>= 10
        unit += 1
    return f"{delta:9d}{UNITS[unit]} "


def format_prot(prot: int, level: int) -> str:
    """printk_prot(): the flag columns and the level name (level is Linux's, pgd=0 .. pte=4)."""
    if not prot & e.P:
        return NOT_PRESENT + LEVEL_NAMES[level]
    pat = (level == 4 and prot & e.PAT_4K) or (level in (2, 3) and prot & e.PAT_LARGE)
    return "".join((
        "USR " if prot & e.US else "    ",
        "RW " if prot & e.RW else "ro ",
        "PWT " if prot & e.PWT else "    ",
        "PCD " if prot & e.PCD else "    ",
        "PSE " if level <= 3 and prot & e.PS else "    ",  # bit 7 is PAT in a pte
        "PAT " if pat else "    ",
        "GLB " if prot & e.G else "    ",
        "NX " if prot & e.NX else "x  ",
        LEVEL_NAMES[level],
    ))


def linux_level(depth: np.ndarray | int, geometry: Geometry) -> np.ndarray | int:
    """Linux's level number (pgd=0 .. pte=4) of a walk depth: with 4 levels
    the folded p4d's holes are reported at real_depth() 0, the pgd."""
    if geometry.levels == 5:
        return depth
    return np.where(depth == 0, 0, depth + 1) if isinstance(depth, np.ndarray) else (depth and depth + 1)


@dataclass
class _Entries:
    """What note_page() is called with, as runs of equal entries in raw
    (unsign-extended) address order: calls at start, start + entry, ... < end."""

    start: np.ndarray
    end: np.ndarray
    entry: np.ndarray
    prot: np.ndarray
    eff: np.ndarray
    level: np.ndarray

    def take(self, index: np.ndarray) -> _Entries:
        return _Entries(*(getattr(self, f)[index] for f in ("start", "end", "entry", "prot", "eff", "level")))


def _noted_entries(ranges: np.ndarray, geometry: Geometry) -> _Entries:
    bits = geometry.va_bits
    full = np.uint64(1 << bits)
    mask = np.uint64((1 << bits) - 1)
    start = ranges["va"] & mask
    # va + size is the canonical end for parsed lines and a raw one for the
    # walker's runs that cross from the user half into the kernel half: the
    # low bits are the raw end either way, and 0 is the top of the space.
    end = (ranges["va"] + ranges["size"]) & mask
    end = np.where(end <= start, full, end)
    depth = ranges["level"].astype(np.int64)
    level = linux_level(depth, geometry)
    prot = ranges["prot"].copy()
    eff = ranges["eff"].copy()
    present = (prot & np.uint64(e.P)) != 0
    # pgd_none_or_clear_bad()/p4d_none_or_clear_bad(): a non-present top
    # entry, zero or not, is reported as a hole with value 0.
    cleared = ~present & (level <= 1)
    prot[cleared] = 0
    eff[cleared] = 0
    # A non-present but non-zero pud is no pud_leaf() (it needs P) and a pmd is
    # a pmd_leaf() only with PSE: the walker calls no note_page() for them, and
    # the run before goes on over them.
    silent = ~present & (prot != 0) & ((level == 2) | ((level == 3) & ((prot & np.uint64(e.PS)) == 0)))
    entry = np.left_shift(np.uint64(1), (12 + 9 * (geometry.levels - 1 - depth)).astype(np.uint64))
    noted = _Entries(start, end, entry, prot, eff, level.astype(np.int8)).take(np.flatnonzero(~silent))
    # ptdump_walk_pgd_level_core() walks [0, half) and [GUARD_HOLE_END, ~0UL):
    # the guard hole's 16 top-level slots are never visited.
    hole_lo = np.uint64(1 << (bits - 1))
    hole_hi = hole_lo + np.uint64(16 << geometry.shift(0))
    low = noted.take(np.flatnonzero(noted.start < hole_lo))
    low.end = np.minimum(low.end, hole_lo)
    high = noted.take(np.flatnonzero(noted.end > hole_hi))
    high.start = np.maximum(high.start, hole_hi)
    both = _Entries(*(np.concatenate((getattr(low, f), getattr(high, f)))
                      for f in ("start", "end", "entry", "prot", "eff", "level")))
    both = both.take(np.argsort(both.start, kind="stable"))
    # An entry is noted until the next one starts (parsed lines and gaps overlap or leave room).
    if len(both.start):
        both.end = np.minimum(both.end, np.concatenate((both.start[1:], both.end[-1:])))
    return both


def _raw_address(va: int, geometry: Geometry) -> int:
    """Where a canonical (or non-canonical marker) address falls in raw address order."""
    half = 1 << (geometry.va_bits - 1)
    kernel = (1 << 64) - half
    if va < half:
        return va
    return half if va < kernel else va - kernel + half


def _first_note_at_or_after(n: _Entries, addr: int) -> int | None:
    i = int(np.searchsorted(n.start, np.uint64(addr), side="right")) - 1
    if i >= 0 and addr < int(n.end[i]):
        s, step = int(n.start[i]), int(n.entry[i])
        call = s + -(-(addr - s) // step) * step
        if call < int(n.end[i]):
            return call
    j = int(np.searchsorted(n.start, np.uint64(addr), side="left"))
    return int(n.start[j]) if j < len(n.start) else None


def format_walk(w: Walk, markers: list[Marker] | None = None) -> str:
    """The ptdump text of a walked tree (current_user if w is a user CR3's)."""
    # ptdump breaks a line only on flags, rights or level, never on frames:
    # the walk's runs ignoring pa print the same lines, and they expand the
    # ESPfix area's aliases to a handful of runs instead of millions of pages.
    return format_ranges(w.runs(), w.geometry, markers)


def format_ranges(ranges: np.ndarray, geometry: Geometry, markers: list[Marker] | None = None) -> str:
    """The text Linux prints for a tree whose walk (or parsed ptdump) gave these ranges."""
    if markers is None:
        markers = LINUX_X86_64_MARKERS(geometry)
    n = _noted_entries(ranges, geometry)
    if not len(n.start):
        # The final flush is then the first call: it prints the first header only.
        return f"---[ {markers[0].name} ]---\n"
    same = (n.prot[1:] == n.prot[:-1]) & (n.eff[1:] == n.eff[:-1]) & (n.level[1:] == n.level[:-1])
    breaks = n.start[np.flatnonzero(np.concatenate(([True], ~same)))]
    # The first call sets the marker without comparing; later ones advance one marker each.
    advances: list[int] = []
    last = int(n.start[0])
    for marker in markers[1:]:
        call = _first_note_at_or_after(n, max(_raw_address(marker.start, geometry), last + 1))
        if call is None:
            break
        advances.append(call)
        last = call
    adv = np.array(advances, dtype=np.uint64)
    starts = np.union1d(breaks, adv)
    owner = np.searchsorted(n.start, starts, side="right") - 1
    group = np.searchsorted(adv, starts, side="right")
    first = np.searchsorted(group, np.arange(len(advances) + 2))
    cap = np.array([m.max_lines for m in markers[:len(advances) + 1]], dtype=np.int64)
    rank = np.arange(len(starts)) - first[group]
    shown = np.flatnonzero((cap[group] == 0) | (rank < cap[group]))

    half = np.uint64(1 << (geometry.va_bits - 1))
    lift = np.uint64(((1 << 64) - (1 << geometry.va_bits)) & U64)
    canon = np.where(starts >= half, starts + lift, starts)
    ends = np.concatenate((canon[1:], np.zeros(1, np.uint64)))  # the flush call is at address 0
    lines = _format_lines(canon[shown], ends[shown], n.prot[owner[shown]], n.level[owner[shown]])

    out: list[str] = []
    at = 0
    for g in range(len(advances) + 1):
        out.append(f"---[ {markers[g].name} ]---\n")
        upto = int(np.searchsorted(shown, first[g + 1]))
        out.extend(lines[at:upto])
        at = upto
        total = int(first[g + 1] - first[g])
        if g < len(advances) and cap[g] and total > cap[g]:
            skipped = total - int(cap[g])
            out.append(f"... {skipped} entr{'y' if skipped == 1 else 'ies'} skipped ... \n")
    return "".join(out)


def _format_lines(start: np.ndarray, end: np.ndarray, prot: np.ndarray, level: np.ndarray) -> list[str]:
    delta = end - start  # wraps for the last line, which ends at 0
    unit = np.zeros(len(delta), dtype=np.int64)
    for _ in range(len(UNITS) - 1):
        step = (delta & np.uint64(1023)) == 0
        delta = np.where(step, delta >> np.uint64(10), delta)
        unit += step
    shown_bits = np.uint64(e.P | e.US | e.RW | e.PWT | e.PCD | e.PS | e.G | e.PAT_LARGE | e.NX)
    prot = prot & shown_bits
    columns: dict[tuple[int, int], str] = {}
    out = []
    for s, t, d, u, p, lv in zip(start.tolist(), end.tolist(), delta.tolist(), unit.tolist(),
                                 prot.tolist(), level.tolist()):
        text = columns.get((p, lv))
        if text is None:
            text = columns[(p, lv)] = format_prot(p, lv)
        out.append(f"0x{s:016x}-0x{t:016x}   {d:9d}{UNITS[u]} {text}\n")
    return out


@dataclass
class Ptdump:
    """A parsed ptdump file.

    ranges: RANGE_DTYPE, one per printed line, level as a depth of geometry
    (inferred from the addresses unless given); pa is 0 (not in the text);
    prot is P plus the printed flags (0 for a blank line); eff is the line's
    own USR/RW/NX, as the file does not show the upper levels.
    markers: (index of the first range under it, name).
    skipped: lines the ESPfix cap left out, in all; skips: (index of the
    range they followed, count) per `... skipped ...` line."""

    ranges: np.ndarray
    markers: list[tuple[int, str]]
    skipped: int
    geometry: Geometry = field(default_factory=Geometry)
    skips: list[tuple[int, int]] = field(default_factory=list)


_LINE = re.compile(r"0x([0-9a-f]{16})-0x([0-9a-f]{16})   ( *\d+)([BKMGTPE]) (.{30})(pgd|p4d|pud|pmd|pte)")
_SKIP = re.compile(r"\.\.\. (\d+) entr(y|ies) skipped \.\.\. ?")
_HEADER = re.compile(r"---\[ (.+) \]---")
_COLUMNS = ((0, 4, {"USR ": e.US, "    ": 0}), (4, 7, {"RW ": e.RW, "ro ": 0}), (7, 11, {"PWT ": e.PWT, "    ": 0}),
            (11, 15, {"PCD ": e.PCD, "    ": 0}), (15, 19, {"PSE ": e.PS, "    ": 0}),
            (19, 23, {"PAT ": -1, "    ": 0}), (23, 27, {"GLB ": e.G, "    ": 0}), (27, 30, {"NX ": e.NX, "x  ": 0}))


def _flags(block: str, level: int) -> int | None:
    """The entry flags behind printk_prot()'s columns, or None if they are not its columns."""
    if block == NOT_PRESENT:
        return 0
    prot = e.P
    for lo, hi, words in _COLUMNS:
        bit = words.get(block[lo:hi])
        if bit is None:
            return None
        if bit == -1:
            if level not in (2, 3, 4):
                return None
            bit = e.PAT_4K if level == 4 else e.PAT_LARGE
        elif bit == e.PS and level == 4:
            return None
        prot |= bit
    return prot


def _infer_geometry(va: np.ndarray) -> Geometry:
    # Only LA57 maps user addresses at or above 2^47 or kernel ones below 0xffff800000000000.
    high_user = (va >= np.uint64(1 << 47)) & (va < np.uint64(1 << 63))
    low_kernel = (va >= np.uint64(1 << 63)) & (va < np.uint64(0xFFFF_8000_0000_0000))
    return Geometry(5 if (high_user | low_kernel).any() else 4)


MAX_LINES = 1 << 21  # 2M ranges (70 MB): a 5-level ptdump of 8192 CPUs prints under 100 000


def parse_ptdump(text: str, source: str = "ptdump", geometry: Geometry | None = None) -> Ptdump:
    """Read any of the kernel, current_kernel and current_user files (`#`
    lines are comments, as ptilab writes them).

    A malformed line raises InputError naming source:line."""
    return _parse(lines_of(text), source, geometry)


def read_ptdump(path: str | Path, geometry: Geometry | None = None) -> Ptdump:
    """parse_ptdump() of a file, read a line at a time (memory bounded by the
    ranges kept, at most MAX_LINES of them, whatever the file's size)."""
    return _parse(read_lines(path, "ptdump text"), str(path), geometry)


_TITLE = re.compile(r"# (current_user|current_kernel)\b")


def read_ptdump_views(path: str | Path) -> dict[str | None, Ptdump]:
    """The dumps of one file by title: `ptilab simulate` writes a
    `# current_user: ...` or `# current_kernel: ...` line before each view;
    a kernel's own file has none (title None)."""
    titled: dict[str | None, Ptdump] = {}
    lines = iter(read_lines(path, "ptdump text"))
    title, pending = None, next(lines, None)
    while pending is not None:
        group: list[tuple[int, str]] = []  # one view's lines: kept whole, as _parse keeps its ranges
        if (m := _TITLE.match(pending[1])):
            title = m[1]
        group.append(pending)
        pending = None
        for number, line in lines:
            if _TITLE.match(line):
                pending = (number, line)
                break
            group.append((number, line))
        if title in titled:
            raise InputError(f"{path}:{group[0][0]}: a second {title} dump in one file")
        titled[title] = _parse(group, str(path), None)
    return titled or {None: _parse([], str(path), None)}


def _parse(lines: Iterable[tuple[int, str]], source: str, geometry: Geometry | None) -> Ptdump:
    rows: list[tuple[int, int, int, int, int, int]] = []
    chunks: list[np.ndarray] = []  # rows packed 64 Ki at a time: 34 bytes each instead of a tuple's ~250
    kept = 0
    markers: list[tuple[int, str]] = []
    skips: list[tuple[int, int]] = []
    columns: dict[tuple[str, int], int | None] = {}
    for number, line in lines:
        if not line.strip() or line.startswith("#"):  # ptilab's own comment lines
            continue
        m = _LINE.fullmatch(line)
        if m:
            start, end = int(m[1], 16), int(m[2], 16)
            level = LEVEL_NAMES.index(m[6])
            key = (m[5], level)
            prot = columns[key] if key in columns else columns.setdefault(key, _flags(m[5], level))
            if prot is None:
                raise InputError(f"{source}:{number}: flag columns {m[5]!r} are not printk_prot()'s for {m[6]}")
            size = (end - start) & U64
            if format_size(size) != f"{m[3].strip():>9}{m[4]} ":
                raise InputError(f"{source}:{number}: size {m[3].strip()}{m[4]} does not match the range "
                                 f"{start:#x}-{end:#x}")
            eff = (EFF_US if prot & e.US else 0) | (EFF_RW if prot & e.RW else 0) | (EFF_NX if prot & e.NX else 0)
            rows.append((start, size, 0, level, prot, eff))
            kept += 1
            if len(rows) == 1 << 16:
                chunks.append(np.array(rows, dtype=RANGE_DTYPE))
                rows.clear()
            if kept > MAX_LINES:
                raise InputError(f"{source}:{number}: more than {MAX_LINES} ranges: larger than any kernel's ptdump")
            continue
        m = _HEADER.fullmatch(line)
        if m:
            markers.append((kept, m[1]))
            continue
        m = _SKIP.fullmatch(line)
        if m and (m[2] == "y") == (m[1] == "1"):
            skips.append((kept - 1, int(m[1])))
            continue
        raise InputError(f"{source}:{number}: not a ptdump line: {line[:70]!r}")
    if not kept:
        raise InputError(f"{source}: no ptdump lines")
    ranges = np.concatenate([*chunks, np.array(rows, dtype=RANGE_DTYPE)])
    geometry = geometry or _infer_geometry(ranges["va"])
    depth = ranges["level"].astype(np.int64) - (5 - geometry.levels)
    # A 4-level kernel prints its top level as pgd (see the module docstring);
    # a 4-level text whose top level says p4d (older ptilab wrote it) is read the same.
    ranges["level"] = np.maximum(depth, 0)
    return Ptdump(ranges, markers, sum(c for _, c in skips), geometry, skips)


def skipped_copies(p: Ptdump, period_max: int = 8) -> np.ndarray:
    """How many lines of the kernel's each printed line stands for: 1, and
    for the lines a `... N entries skipped ...` follows, the repeats of
    their pattern the kernel left out. The cap hides the ESPfix area's
    regular alternation (a page, the hole to the next stack, ...): the N
    skipped lines continue the last period of the printed ones and end with
    the one hole that runs up to the next marker, as Linux's own ESPfix text
    does (16 lines and 131059 skipped stand for 65536 pages)."""
    copies = np.ones(len(p.ranges), np.int64)
    kind = np.stack([p.ranges["prot"], p.ranges["level"].astype(np.uint64), p.ranges["size"]], axis=1)
    for last, n in p.skips:
        for period in range(1, period_max + 1):
            a = last - 2 * period + 1
            if a >= 0 and (kind[a:a + period] == kind[a + period:last + 1]).all():
                copies[last - period + 1:last + 1] += (n - 1) // period
                break
        else:
            raise InputError(f"{n} skipped ptdump lines follow lines without a repeating pattern: "
                             f"what they stand for cannot be told")
    return copies
