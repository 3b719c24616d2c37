"""Linux ptdump text (/sys/kernel/debug/page_tables/*), written and read.

Written the way Linux 6.1's arch/x86/mm/dump_pagetables.c does it over the
generic walker of mm/ptdump.c: a run breaks on a change of the entry's flags,
of the effective rights, of the level, or at an address marker; the ESPfix
area prints at most 16 lines. Levels are numbered pgd=0 .. pte=4 whatever the
paging mode: with 4-level paging the p4d is folded at run time, pgd_none() is
always false, and a hole in the top-level table is reported at the p4d level.

Debian's 6.1 kernel has no CONFIG_PTDUMP_DEBUGFS, so no real file checked
these bytes; the format follows the source line by line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ptilab.errors import InputError
from ptilab.paging import EFF_NX, EFF_RW, EFF_US, RANGE_DTYPE, Geometry, Walk
from ptilab.paging import entry as e

LEVEL_NAMES = ("pgd", "p4d", "pud", "pmd", "pte")
NOT_PRESENT = " " * 30
UNITS = "BKMGTPE"


@dataclass(frozen=True)
class Marker:
    start: int
    name: str
    max_lines: int = 0


def linux_markers(geometry: Geometry, page_offset: int | None = None, vmalloc: int | None = None,
                  vmemmap: int | None = None, fixaddr_start: int = 0xFFFF_FFFF_FF57_9000) -> list[Marker]:
    """address_markers[] of x86-64 Linux 6.1 as Debian configures it (LDT remap,
    ESPfix and EFI on, no KASAN). KASLR moves page_offset/vmalloc/vmemmap; the
    fixmap's start depends on the configuration's fixmap size."""
    five = geometry.levels == 5
    return [
        Marker(0, "User Space"),
        Marker(1 << 63, "Kernel Space"),
        Marker(0xFF10_0000_0000_0000 if five else 0xFFFF_8800_0000_0000, "LDT remap"),
        Marker(page_offset or (0xFF11_0000_0000_0000 if five else 0xFFFF_8880_0000_0000), "Low Kernel Mapping"),
        Marker(vmalloc or (0xFFA0_0000_0000_0000 if five else 0xFFFF_C900_0000_0000), "vmalloc() Area"),
        Marker(vmemmap or (0xFFD4_0000_0000_0000 if five else 0xFFFF_EA00_0000_0000), "Vmemmap"),
        Marker(0xFFFF_FE00_0000_0000, "CPU entry Area"),
        Marker(0xFFFF_FF00_0000_0000, "ESPfix Area", 16),
        Marker(0xFFFF_FFEF_0000_0000, "EFI Runtime Services"),
        Marker(0xFFFF_FFFF_8000_0000, "High Kernel Mapping"),
        Marker(0xFFFF_FFFF_C000_0000, "Modules"),
        Marker(0xFFFF_FFFF_FF00_0000, "End Modules"),
        Marker(fixaddr_start, "Fixmap Area"),
    ]


def _size(delta: int) -> str:
    unit = 0
    while delta and not delta & 1023 and unit < len(UNITS) - 1:
        delta >>= 10
        unit += 1
    return f"{delta:9d}{UNITS[unit]} "


def _prot(pr: int, level: int) -> str:
    """printk_prot()."""
    if not pr & e.P:
        return NOT_PRESENT + LEVEL_NAMES[level]
    return "".join((
        "USR " if pr & e.US else "    ",
        "RW " if pr & e.RW else "ro ",
        "PWT " if pr & e.PWT else "    ",
        "PCD " if pr & e.PCD else "    ",
        "PSE " if level <= 3 and pr & e.PS else "    ",
        "PAT " if (level == 4 and pr & e.PAT_4K) or (level in (2, 3) and pr & e.PAT_LARGE) else "    ",
        "GLB " if pr & e.G else "    ",
        "NX " if pr & e.NX else "x  ",
        LEVEL_NAMES[level],
    ))


def _guard_hole(geometry: Geometry) -> tuple[int, int]:
    """GUARD_HOLE_{BASE,END}_ADDR: 16 top-level slots ptdump never walks."""
    shift = geometry.shift(0)
    base = ((-256) << shift) & 0xFFFF_FFFF_FFFF_FFFF
    return base, base + (16 << shift)


def format_walk(w: Walk, markers: list[Marker]) -> str:
    return format_ranges(w.ranges, w.geometry, markers)


def format_ranges(ranges: np.ndarray, geometry: Geometry, markers: list[Marker]) -> str:
    """The text Linux prints for a tree whose walk gave these ranges.

    Linux calls note_page() at every entry it visits and compares with the
    run so far; a run breaks on new flags, rights or level, or once an
    entry's address reaches the next marker (one marker per call, so a
    marker inside one large entry waits for the next entry). The ranges here
    are runs already; only the entry boundaries that can cross a marker are
    replayed.
    """
    if not len(ranges):
        return ""
    hole_start, hole_end = _guard_hole(geometry)
    r = ranges.copy()
    lo, hi = np.uint64(hole_start), np.uint64(hole_end)
    straddle = (r["va"] >= lo) & (r["va"] < hi) & (r["va"] + r["size"] > hi)
    r["size"][straddle] -= hi - r["va"][straddle]
    r["va"][straddle] = hi
    r = r[(r["va"] < lo) | (r["va"] >= hi)]
    level = (r["level"].astype(np.int64) + (5 - geometry.levels)).tolist()
    shifts = [geometry.shift(int(d)) for d in r["level"].tolist()]
    out: list[str] = []
    state = {"level": -1, "prot": 0, "eff": 0, "start": 0, "marker": 0, "lines": 0}

    def note(addr: int, prot: int, eff: int, lvl: int) -> None:
        st = state
        if st["level"] == -1:
            st.update(prot=prot, eff=eff, level=lvl, start=addr, marker=0, lines=0)
            out.append(f"---[ {markers[0].name} ]---\n")
            return
        nxt = markers[st["marker"] + 1].start if st["marker"] + 1 < len(markers) else 1 << 64
        crossed = addr >= nxt and lvl != -2
        if prot == st["prot"] and eff == st["eff"] and lvl == st["level"] and not crossed:
            return
        current = markers[st["marker"]]
        if not current.max_lines or st["lines"] < current.max_lines:
            delta = (addr - st["start"]) & 0xFFFF_FFFF_FFFF_FFFF
            out.append(f"0x{st['start']:016x}-0x{addr:016x}   {_size(delta)}{_prot(st['prot'], st['level'])}\n")
        st["lines"] += 1
        if crossed:
            if current.max_lines and st["lines"] > current.max_lines:
                skipped = st["lines"] - current.max_lines
                out.append(f"... {skipped} entr{'y' if skipped == 1 else 'ies'} skipped ... \n")
            st["marker"] += 1
            st["lines"] = 0
            out.append(f"---[ {markers[st['marker']].name} ]---\n")
        st.update(start=addr, prot=prot, eff=eff, level=lvl)

    for va, size, prot, eff, lvl, shift in zip(r["va"].tolist(), r["size"].tolist(), r["prot"].tolist(),
                                               r["eff"].tolist(), level, shifts):
        note(va, prot, eff, lvl)
        end = va + size
        entry = 1 << shift
        while state["marker"] + 1 < len(markers):
            target = markers[state["marker"] + 1].start
            if not va < target < end:
                break
            boundary = va + -(-(target - va) // entry) * entry
            if boundary >= end:
                break
            note(boundary, prot, eff, lvl)
    # mm/ptdump.c ends with note_page(st, 0, -1, 0): the last run ends at 0.
    note(0, 0, 0, -2)
    return "".join(out)


_LINE = re.compile(r"^0x([0-9a-f]{16})-0x([0-9a-f]{16})\s+(\d+)([BKMGTPE]) (.{30}|USR .*?|    .*?)(pgd|p4d|pud|pmd|pte)$")
_FLAGS = {"USR": e.US, "RW": e.RW, "PWT": e.PWT, "PCD": e.PCD, "PSE": e.PS, "GLB": e.G, "NX": e.NX}


@dataclass
class Ptdump:
    """A parsed ptdump file: ranges (RANGE_DTYPE, levels as pgd=0..pte=4) and
    the markers seen, with how many lines each had skipped."""

    ranges: np.ndarray
    markers: list[tuple[int, str]]
    skipped: int


def parse_ptdump(text: str, source: str = "ptdump") -> Ptdump:
    """Read any of kernel, current_kernel, current_user. Effective rights are
    those of the printed entry: the file does not show the upper levels."""
    rows, markers, skipped = [], [], 0
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.startswith("---[ ") and line.endswith(" ]---"):
            markers.append((len(rows), line[5:-5]))
            continue
        if line.startswith("... ") and "skipped" in line:
            try:
                skipped += int(line.split()[1])
            except (IndexError, ValueError):
                raise InputError(f"{source}:{number}: malformed skip line: {line[:60]!r}") from None
            continue
        m = _LINE.match(line)
        if not m:
            raise InputError(f"{source}:{number}: not a ptdump line: {line[:70]!r}")
        start, end = int(m.group(1), 16), int(m.group(2), 16)
        words = m.group(5).split()
        prot = 0
        if m.group(5).strip():
            prot = e.P
            for word in words:
                if word == "PAT":
                    prot |= e.PAT_LARGE if m.group(6) != "pte" else e.PAT_4K
                else:
                    prot |= _FLAGS.get(word, 0)
        eff = ((EFF_US if prot & e.US else 0) | (EFF_RW if prot & e.RW else 0) | (EFF_NX if prot & e.NX else 0)) \
            if prot else 0
        rows.append((start, (end - start) & 0xFFFF_FFFF_FFFF_FFFF, 0, LEVEL_NAMES.index(m.group(6)), prot, eff))
    if not rows:
        raise InputError(f"{source}: no ptdump lines")
    return Ptdump(np.array(rows, dtype=RANGE_DTYPE), markers, skipped)
