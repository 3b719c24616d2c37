"""Writing entries into a tree: descend to a level, creating missing tables.

This is the mechanism under Linux's set_pte_vaddr(), pti_user_pagetable_walk_*()
and the model's designs. Where a table comes from (memblock, buddy) is the
caller's business: it passes the allocator as a function.
"""

from __future__ import annotations

from typing import Callable, Iterator, Protocol

import numpy as np

from ptilab.paging import entry as e
from ptilab.paging.geometry import Geometry


class WritableMemory(Protocol):
    def read_entry(self, pa: int) -> int: ...
    def write_entry(self, pa: int, value: int) -> None: ...
    def write_entries(self, pa: int, values: np.ndarray) -> None: ...


AllocTable = Callable[[], int]  # returns the physical address of a zeroed 4 KiB frame


class LargePageInTheWay(Exception):
    """A leaf sits where a table is needed: Linux would have to split it first."""


def entry_address(mem: WritableMemory, geometry: Geometry, pgd: int, va: int, depth: int,
                  alloc: AllocTable | None = None, table_flags: int = e.KERNPG_TABLE) -> int | None:
    """Physical address of va's entry at depth below pgd. Missing tables are
    created with alloc and linked with table_flags; without alloc, None."""
    table = pgd
    for d in range(depth):
        slot = table + 8 * geometry.index(va, d)
        value = mem.read_entry(slot)
        if not value & e.P:
            if alloc is None:
                return None
            new = alloc()
            mem.write_entry(slot, new | table_flags)
            value = new | table_flags
        elif value & e.PS and d < geometry.levels - 1:
            raise LargePageInTheWay(f"{va:#x}: a {geometry.names[d]} leaf maps it already")
        table = e.frame_address(value)
    return table + 8 * geometry.index(va, depth)


def set_entry(mem: WritableMemory, geometry: Geometry, pgd: int, va: int, depth: int, value: int,
              alloc: AllocTable, table_flags: int = e.KERNPG_TABLE) -> int:
    """Install value as va's entry at depth; returns the entry's physical address."""
    slot = entry_address(mem, geometry, pgd, va, depth, alloc, table_flags)
    assert slot is not None
    mem.write_entry(slot, value)
    return slot


def map_page(mem: WritableMemory, geometry: Geometry, pgd: int, va: int, pa: int, flags: int,
             alloc: AllocTable, page_shift: int = e.PAGE_SHIFT, table_flags: int = e.KERNPG_TABLE) -> int:
    """Map one page of 1 << page_shift bytes (4K, 2M or 1G); PS is set for large pages."""
    depth = geometry.levels - 1 - (page_shift - e.PAGE_SHIFT) // 9
    if page_shift != e.PAGE_SHIFT:
        flags |= e.PS
    if va & ((1 << page_shift) - 1) or pa & ((1 << page_shift) - 1):
        raise ValueError(f"{va:#x} -> {pa:#x} is not aligned to {1 << page_shift:#x}")
    return set_entry(mem, geometry, pgd, va, depth, pa | flags, alloc, table_flags)


def table_runs(mem: WritableMemory, geometry: Geometry, pgd: int, va: int, count: int, depth: int,
               alloc: AllocTable | None = None, table_flags: int = e.KERNPG_TABLE) -> Iterator[tuple[int, int, int]]:
    """Split count consecutive entries at depth, starting with va's, by the
    table holding them: yields (entry physical address, first index into the
    run, entries in this table). Missing tables are created with alloc, or
    skipped without it."""
    span = 1 << geometry.shift(depth)
    done = 0
    while done < count:
        here = va + done * span
        n = min(count - done, 512 - geometry.index(here, depth))
        slot = entry_address(mem, geometry, pgd, here, depth, alloc, table_flags)
        if slot is not None:
            yield slot, done, n
        done += n
