"""One address through the tables, entry by entry, as the MMU does it (SDM 4.5.4)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dataclasses import dataclass, field

from ptilab.paging import entry as e
from ptilab.paging.cr3 import CR3
from ptilab.paging.geometry import Geometry

if TYPE_CHECKING:
    from ptilab.memory.physical import PhysicalMemory


@dataclass(frozen=True)
class EntryRead:
    """One load the page walker made: which table entry, at which level, holding what."""

    level: str
    pa: int  # physical address of the 8-byte entry
    value: int


@dataclass(frozen=True)
class Translation:
    va: int
    pa: int
    page_size: int
    level: str
    leaf: int  # the leaf entry
    writable: bool
    user: bool
    executable: bool
    global_: bool
    reads: tuple[EntryRead, ...] = field(default=())


class PageFault(Exception):
    """The walk stopped: not present, or a reserved bit set (PFEC.RSVD)."""

    def __init__(self, va: int, reads: tuple[EntryRead, ...], reserved: bool = False):
        kind = "reserved bit set" if reserved else "not present"
        where = reads[-1].level if reads else "cr3"
        super().__init__(f"#PF at {va:#x}: {kind} at {where}")
        self.va = va
        self.reads = reads
        self.reserved = reserved


def reserved_bits(value: int, depth: int, geometry: Geometry, maxphyaddr: int = e.PHYS_ADDR_BITS_MAX) -> bool:
    """True if a present entry has a bit set that SDM tables 4-15..4-20 reserve."""
    if value & (((1 << e.PHYS_ADDR_BITS_MAX) - 1) & ~((1 << maxphyaddr) - 1)):
        return True
    last = geometry.levels - 1
    if depth < last and value & e.PS:
        if not geometry.leaf_allowed(depth):
            return True  # PS in a PML5E/PML4E
        shift = geometry.shift(depth)
        if value & e.large_page_reserved(shift):
            return True  # address bits below the large page's alignment, above PAT
    return False


def translate(mem: PhysicalMemory, cr3: CR3 | int, va: int, geometry: Geometry,
              maxphyaddr: int = e.PHYS_ADDR_BITS_MAX) -> Translation:
    """Translate va like the MMU, returning the frame, the effective rights and
    every entry read on the way; raise PageFault where the walk stops."""
    if isinstance(cr3, int):
        cr3 = CR3(cr3)
    if not geometry.is_canonical(va):
        raise ValueError(f"{va:#x} is not canonical for {geometry.levels}-level paging")
    table = cr3.pgd
    writable = user = True
    executable = True
    reads: list[EntryRead] = []
    for depth in range(geometry.levels):
        entry_pa = table + 8 * geometry.index(va, depth)
        value = mem.read_entry(entry_pa)
        reads.append(EntryRead(geometry.names[depth], entry_pa, value))
        if not value & e.P:
            raise PageFault(va, tuple(reads))
        if reserved_bits(value, depth, geometry, maxphyaddr):
            raise PageFault(va, tuple(reads), reserved=True)
        writable &= bool(value & e.RW)
        user &= bool(value & e.US)
        executable &= not value & e.NX
        last = depth == geometry.levels - 1
        if last or value & e.PS:
            shift = geometry.shift(depth)
            base = e.frame_address(value, shift, maxphyaddr)
            return Translation(va, base | (va & ((1 << shift) - 1)), 1 << shift, geometry.names[depth],
                               value, writable, user, executable, bool(value & e.G), tuple(reads))
        table = e.frame_address(value, e.PAGE_SHIFT, maxphyaddr)
    raise AssertionError("unreachable: the last level is always a leaf")
