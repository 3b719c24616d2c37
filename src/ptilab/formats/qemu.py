"""QEMU monitor text: `info mem` and `info tlb` (QEMU 7.2, target/i386/monitor.c), written and read.

QEMU's walker is an independent oracle for ptilab's: the real-kernel tests
require these writers to print exactly what QEMU printed for the same CR3.

- `info mem` (mem_info_la48): one line per run of consecutive present pages
  whose rights are equal, `%016lx-%016lx %016lx %c%c%c`; the rights are the
  leaf's US|RW|P ANDed with every upper entry's, whatever the level, the
  frames, or NX (never shown). start, end and even the size go through
  addr_canonical() (sign extension from bit 47, 56 with LA57); a run reaching
  the top of the space ends at the flush address 1 << 48, which prints as
  0001000000000000.
- `info tlb`: one line per present leaf, `%016lx: %016lx` then nine letters
  XGPDACTUW of the leaf's own bits; the frame is masked to bits 12..49 (21..49,
  30..49 for 2M and 1G leaves), and a pte's bit 7 (PAT) is cleared first, so
  `P` marks large pages only.
- mem_info_la57 of QEMU 7.2 tests `present` the wrong way round below the
  p4d: it skips every present pud and descends into absent ones. On sane
  tables it prints nothing (a zero pud contributes rights 0); it prints only
  absent puds with PS set and US or RW. format_info_mem reproduces that by
  default; an absent, non-zero pud without PS would make QEMU read the frame it
  names as a pmd table, which a walk cannot know, and is taken as printing
  nothing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

import numpy as np

from ptilab.errors import InputError
from ptilab.formats.textfile import lines_of, read_lines
from ptilab.paging import EFF_RW, EFF_US, Walk
from ptilab.paging import entry as e

# Each byte's two hex digits as one 2-byte item: a gather per byte, not per nibble.
_HEX_PAIRS = np.frombuffer(b"".join(f"{b:02x}".encode() for b in range(256)), dtype=np.uint16)
_QEMU_FRAME = 0x3_FFFF_FFFF_F000  # bits 12..49: QEMU assumes 50-bit physical addresses
_TLB_LETTERS = ((e.NX, "X"), (e.G, "G"), (e.PS, "P"), (e.D, "D"), (e.A, "A"), (e.PCD, "C"), (e.PWT, "T"),
                (e.US, "U"), (e.RW, "W"))
TLB_DTYPE = np.dtype([("va", "<u8"), ("pa", "<u8"), ("flags", "U9")])


def _hex16(values: np.ndarray) -> np.ndarray:
    """(n, 16) ASCII bytes of %016lx."""
    big_endian = np.asarray(values, dtype=">u8").view(np.uint8)  # most significant byte first
    return _HEX_PAIRS[big_endian].view(np.uint8).reshape(len(values), 16)


def _text(columns: list[np.ndarray | bytes]) -> str:
    """Glue per-line byte columns (arrays of shape (n, k), or constant bytes) into lines."""
    n = next(len(c) for c in columns if isinstance(c, np.ndarray))
    if not n:
        return ""
    widths = [c.shape[1] if isinstance(c, np.ndarray) else len(c) for c in columns]
    lines = np.empty((n, sum(widths)), dtype=np.uint8)
    at = 0
    for column, width in zip(columns, widths):
        lines[:, at:at + width] = column if isinstance(column, np.ndarray) else np.frombuffer(column, np.uint8)
        at += width
    return str(lines.data, "ascii")  # decoded in place: no bytes copy


def _canonical(values: np.ndarray, bits: int) -> np.ndarray:
    """addr_canonical(): sign-extend from bit 47 (bit 56 with LA57)."""
    top = np.uint64(1 << (bits - 1))
    ext = np.uint64(((1 << 64) - 1) ^ ((1 << bits) - 1))
    return np.where(values & top, values | ext, values)


def format_info_mem(w: Walk, *, qemu_la57_bug: bool = True) -> str:
    """What QEMU 7.2's `info mem` prints for this walk's CR3.

    With 5-level paging and qemu_la57_bug (the default) that is QEMU 7.2's
    inverted walk (see the module docstring); without it, what the 4-level
    walk would print if it went on to 57 bits."""
    bits = w.geometry.va_bits
    mask = np.uint64((1 << bits) - 1)
    r = w.ranges
    present = (r["prot"] & np.uint64(e.P)) != 0
    if w.geometry.levels == 5 and qemu_la57_bug:
        absent_large = ~present & ((r["prot"] & np.uint64(e.PS)) != 0) & (r["level"] == w.geometry.depth_of("pud"))
        shown = absent_large & ((r["eff"] & np.uint8(EFF_US | EFF_RW)) != 0)
    else:
        shown = present
    if not shown.any():
        return ""
    # Only the three fields printed: selecting whole records moves every field.
    start = r["va"][shown] & mask
    end = start + r["size"][shown]
    rights = r["eff"][shown] & np.uint8(EFF_US | EFF_RW)
    join = (start[1:] == end[:-1]) & (rights[1:] == rights[:-1])
    first = np.flatnonzero(np.concatenate(([True], ~join)))
    last = np.concatenate((first[1:], [len(start)])) - 1
    s, t, rights = start[first], end[last], rights[first]
    return format_info_mem_rows(_canonical(s, bits), _canonical(t, bits), _canonical(t - s, bits),
                                (rights & EFF_US) != 0, (rights & EFF_RW) != 0)


def format_info_mem_rows(start: np.ndarray, end: np.ndarray, size: np.ndarray,
                         user: np.ndarray, writable: np.ndarray) -> str:
    """`info mem` lines from their columns, already canonical as QEMU prints them."""
    as_u64 = [np.asarray(x, dtype=np.uint64) for x in (start, end, size)]
    u = np.where(np.asarray(user, bool), ord("u"), ord("-")).astype(np.uint8)[:, None]
    wr = np.where(np.asarray(writable, bool), ord("w"), ord("-")).astype(np.uint8)[:, None]
    return _text([_hex16(as_u64[0]), b"-", _hex16(as_u64[1]), b" ", _hex16(as_u64[2]), b" ", u, b"r", wr, b"\n"])


def format_info_tlb(w: Walk) -> str:
    """What QEMU 7.2's `info tlb` prints: every present leaf page, in address order."""
    bits = w.geometry.va_bits
    r = w.mapped
    if not len(r):
        return ""
    shift = (12 + 9 * (w.geometry.levels - 1 - r["level"].astype(np.int64))).astype(np.uint64)
    counts = (r["size"] >> shift).astype(np.int64)
    owner = np.repeat(np.arange(len(r)), counts)
    index = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    step = index.astype(np.uint64) << shift[owner]
    va = _canonical((r["va"][owner] & np.uint64((1 << bits) - 1)) + step, bits)
    frame = (r["pa"][owner] + step) & np.uint64(_QEMU_FRAME)
    own = np.where(r["level"] == w.geometry.levels - 1, r["prot"] & ~np.uint64(e.PS), r["prot"])
    letters = np.stack([np.where((own & np.uint64(bit)) != 0, ord(ch), ord("-")).astype(np.uint8)
                        for bit, ch in _TLB_LETTERS], axis=1)
    return _text([_hex16(va), b": ", _hex16(frame), b" ", letters[owner], b"\n"])


_MEM_LINE = re.compile(r"([0-9a-f]{16})-([0-9a-f]{16}) ([0-9a-f]{16}) ([u-]r[w-])")
_TLB_LINE = re.compile(r"([0-9a-f]{16}): ([0-9a-f]{16}) ([X-][G-][P-][D-][A-][C-][T-][U-][W-])")


# A QEMU guest of 256 MiB prints 70 000 `info mem` lines and 90 000 of `info tlb`.
MAX_ROWS = 1 << 20  # info tlb: 32 bytes a row
MAX_MEM_ROWS = 1 << 19  # info mem: a Python tuple a row, ~230 bytes


def parse_info_mem(text: str, source: str = "info mem") -> list[tuple[int, int, int, str]]:
    """`info mem` lines -> (start, end, size, 'urw'-style rights), as printed (canonical)."""
    return _info_mem(lines_of(text), source)


def read_info_mem(path: str | Path) -> list[tuple[int, int, int, str]]:
    """parse_info_mem() of a file, read a line at a time."""
    return _info_mem(read_lines(path, "QEMU 'info mem' text"), str(path))


def _info_mem(lines: Iterable[tuple[int, str]], source: str) -> list[tuple[int, int, int, str]]:
    out = []
    rights: dict[str, str] = {}  # the four spellings, shared by every row
    for number, line in lines:
        m = _MEM_LINE.fullmatch(line)
        if not m:
            if not line.strip():
                continue
            raise InputError(f"{source}:{number}: not 'start-end size [u-]r[w-]': {line[:70]!r}")
        if len(out) == MAX_MEM_ROWS:
            raise InputError(f"{source}:{number}: more than {MAX_MEM_ROWS} lines: larger than any guest's 'info mem'")
        out.append((int(m[1], 16), int(m[2], 16), int(m[3], 16), rights.setdefault(m[4], m[4])))
    return out


def format_parsed_info_mem(rows: list[tuple[int, int, int, str]]) -> str:
    """parse_info_mem()'s rows printed back."""
    if not rows:
        return ""
    start, end, size, rights = zip(*rows)
    return format_info_mem_rows(np.array(start, np.uint64), np.array(end, np.uint64), np.array(size, np.uint64),
                                np.array([p[0] == "u" for p in rights]), np.array([p[2] == "w" for p in rights]))


def parse_info_tlb(text: str, source: str = "info tlb") -> np.ndarray:
    """`info tlb` lines -> TLB_DTYPE records (va as printed, frame, the nine flag letters)."""
    return _info_tlb(lines_of(text), source)


def read_info_tlb(path: str | Path) -> np.ndarray:
    """parse_info_tlb() of a file, read a line at a time."""
    return _info_tlb(read_lines(path, "QEMU 'info tlb' text"), str(path))


def _info_tlb(lines: Iterable[tuple[int, str]], source: str) -> np.ndarray:
    chunks, rows = [], []  # rows packed 64 Ki at a time
    kept = 0
    for number, line in lines:
        m = _TLB_LINE.fullmatch(line)
        if not m:
            if not line.strip():
                continue
            raise InputError(f"{source}:{number}: not 'va: frame XGPDACTUW': {line[:70]!r}")
        kept += 1
        if kept > MAX_ROWS:
            raise InputError(f"{source}:{number}: more than {MAX_ROWS} lines: larger than any guest's 'info tlb'")
        rows.append((int(m[1], 16), int(m[2], 16), m[3]))
        if len(rows) == 1 << 16:
            chunks.append(np.array(rows, dtype=TLB_DTYPE))
            rows.clear()
    return np.concatenate([*chunks, np.array(rows, dtype=TLB_DTYPE)])
