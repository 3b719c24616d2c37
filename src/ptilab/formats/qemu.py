"""QEMU monitor text: `info mem` and `info tlb` (QEMU 7.2 target/i386/monitor.c).

QEMU's walker is an independent oracle for ptilab's: the tests require
`ptilab dump --format qemu` to equal QEMU's own text line for line.
"""

from __future__ import annotations

import numpy as np

from ptilab.errors import InputError
from ptilab.paging import EFF_RW, EFF_US, Walk
from ptilab.paging import entry as e

# print_pte()'s frame masks: bits 12..49, 21..49, 30..49 (QEMU assumes 50-bit physical).
_TLB_MASK = {12: 0x3FFFFFFFFF000, 21: 0x3FFFFFFE00000, 30: 0x3FFFFC0000000}
_TLB_FLAGS = ((e.NX, "X"), (e.G, "G"), (e.PS, "P"), (e.D, "D"), (e.A, "A"), (e.PCD, "C"), (e.PWT, "T"),
              (e.US, "U"), (e.RW, "W"))


def _raw(va: np.ndarray, bits: int) -> np.ndarray:
    return va & np.uint64((1 << bits) - 1)


def _canonical(values: np.ndarray, bits: int) -> np.ndarray:
    """addr_canonical(): sign-extend from bit 47 (bit 56 with LA57)."""
    top = np.uint64(1 << (bits - 1))
    ext = np.uint64(((1 << 64) - 1) ^ ((1 << bits) - 1))
    return np.where(values & top, values | ext, values)


def format_info_mem(w: Walk) -> str:
    """`info mem`: runs of virtually contiguous present pages with the same
    user/write rights (ANDed down the levels), whatever their frames and levels."""
    bits = w.geometry.va_bits
    r = w.mapped
    if not len(r):
        return ""
    start = _raw(r["va"], bits)
    end = start + r["size"]
    prot = r["eff"] & np.uint8(EFF_US | EFF_RW)
    join = (start[1:] == end[:-1]) & (prot[1:] == prot[:-1])
    first = np.flatnonzero(np.concatenate(([True], ~join)))
    last = np.concatenate((first[1:], [len(r)])) - 1
    s, t = start[first], end[last]
    cols = (_canonical(s, bits), _canonical(t, bits), _canonical(t - s, bits))
    letters = np.where(prot[first] & EFF_US, "u", "-"), np.where(prot[first] & EFF_RW, "w", "-")
    return "".join(f"{a:016x}-{b:016x} {c:016x} {u}r{wr}\n"
                   for a, b, c, u, wr in zip(*(x.tolist() for x in cols), *(x.tolist() for x in letters)))


def format_info_tlb(w: Walk) -> str:
    """`info tlb`: one line per present leaf entry, its own flags (not the walk's)."""
    bits = w.geometry.va_bits
    r = w.mapped
    if not len(r):
        return ""
    shift = np.array([w.geometry.shift(int(d)) for d in r["level"]], dtype=np.uint64)
    counts = (r["size"] >> shift).astype(np.int64)
    owner = np.repeat(np.arange(len(r)), counts)
    index = (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)).astype(np.uint64)
    step = index << shift[owner]
    va = _canonical(_raw(r["va"][owner], bits) + step, bits)
    level_shift = shift[owner]
    entry = (r["pa"][owner] + step) | r["prot"][owner]
    lines = []
    for v, ent, sh in zip(va.tolist(), entry.tolist(), level_shift.tolist()):
        flags = "".join(ch if ent & bit else "-" for bit, ch in _TLB_FLAGS)
        lines.append(f"{v:016x}: {ent & _TLB_MASK[sh]:016x} {flags}\n")
    return "".join(lines)


def parse_info_mem(text: str) -> list[tuple[int, int, int, str]]:
    """`info mem` lines -> (start, end, size, 'urw'-style rights)."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.replace("-", " ", 1).split()
        if not line.strip():
            continue
        try:
            start, end, size = (int(x, 16) for x in parts[:3])
            rights = parts[3]
        except (ValueError, IndexError):
            raise InputError(f"info mem line {number} is not 'start-end size prot': {line[:60]!r}") from None
        if len(rights) != 3:
            raise InputError(f"info mem line {number}: rights {rights!r} are not three letters")
        out.append((start, end, size, rights))
    return out


def parse_info_tlb(text: str) -> list[tuple[int, int, str]]:
    """`info tlb` lines -> (virtual address, frame, flag letters)."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            va, rest = line.split(":", 1)
            pa, flags = rest.split()
            out.append((int(va, 16), int(pa, 16), flags))
        except ValueError:
            raise InputError(f"info tlb line {number} is not 'va: pa flags': {line[:60]!r}") from None
    return out
