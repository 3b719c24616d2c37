"""Writing entries into a tree: descend to a level, creating missing tables.

This is the mechanism under Linux's set_pte_vaddr(), pti_user_pagetable_walk_*()
and the model's designs. Where a table comes from (memblock, buddy) is the
caller's business: it passes the allocator as a function.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from ptilab.paging import entry as e
from ptilab.paging.geometry import Geometry
from ptilab.paging.walk import sorted_unique


class WritableMemory(Protocol):
    def read_entry(self, pa: int) -> int: ...
    def write_entry(self, pa: int, value: int) -> None: ...
    def write_entries(self, pa: int, values: np.ndarray) -> None: ...
    def write_slots(self, slots: np.ndarray, values: np.ndarray) -> None: ...
    def read_slots(self, slots: np.ndarray) -> np.ndarray: ...


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


def entry_slots(mem: WritableMemory, geometry: Geometry, pgd: int, vas: np.ndarray, depth: int,
                alloc: AllocTable | None = None, table_flags: int = e.KERNPG_TABLE) -> np.ndarray:
    """entry_address() for many addresses at once: each va's entry at depth.

    Missing tables are created with alloc in the very order one entry_address()
    call per va would create them (a table when the first va under it needs
    it, upper levels first), so a batch of a boot's installs lands at the same
    physical addresses as the one-at-a-time kernel code. Without alloc, a va
    whose tables are missing gets NO_SLOT. Each table is looked at once per
    batch, not once per va."""
    vas = np.asarray(vas, dtype=np.uint64)
    # The vas of a run under one table at depth share every table above: the
    # levels above are resolved for the first va of each run only.
    table_of = vas >> np.uint64(geometry.shift(depth) + 9)
    runs = np.flatnonzero(np.append(True, table_of[1:] != table_of[:-1]))
    heads = vas[runs]
    tables = np.full(len(heads), pgd, dtype=np.uint64)
    created: list[tuple[int, int, int]] = []  # (first run, depth, parent slot) of each table to make
    for d in range(depth):
        tables = _tables_below(mem, geometry, heads, tables + _index8(heads, geometry, d), d, alloc is not None,
                               created)
    if created:
        tables = _resolve(tables, _create(mem, created, alloc, table_flags))
    slots = np.repeat(tables, np.diff(np.append(runs, len(vas)))) + _index8(vas, geometry, depth)
    slots[(slots & _MISSING) != 0] = NO_SLOT
    return slots


def _index8(vas: np.ndarray, geometry: Geometry, depth: int) -> np.ndarray:
    """Each va's entry offset (index * 8) in its table at depth."""
    return ((vas >> np.uint64(geometry.shift(depth))) & np.uint64(0x1FF)) << np.uint64(3)


def page_vas(starts: np.ndarray, pages: int) -> np.ndarray:
    """The addresses of pages consecutive 4 KiB pages from each of starts, a row per start."""
    return np.asarray(starts, dtype=np.uint64)[:, None] + (np.arange(pages, dtype=np.uint64) << np.uint64(e.PAGE_SHIFT))


def install_entries(mem: WritableMemory, geometry: Geometry, pgd: int, vas: np.ndarray, values: np.ndarray,
                    depth: int, alloc: AllocTable, table_flags: int = e.KERNPG_TABLE) -> None:
    """Write values as the entries at depth for vas (distinct addresses), creating missing tables."""
    mem.write_slots(entry_slots(mem, geometry, pgd, vas, depth, alloc, table_flags), values)


def read_entries(mem: WritableMemory, geometry: Geometry, pgd: int, vas: np.ndarray, depth: int) -> np.ndarray:
    """Each va's entry at depth, 0 where a table above it is missing."""
    slots = entry_slots(mem, geometry, pgd, vas, depth)
    out = np.zeros(len(slots), dtype=np.uint64)
    found = np.flatnonzero(slots != NO_SLOT)
    out[found] = mem.read_slots(slots[found])
    return out


# Tables a batch has yet to create are named by placeholder addresses with
# _NEW set (table number << 12); tables it may not create carry _MISSING.
NEW, MISSING = 1 << 63, 1 << 62
_NEW, _MISSING = np.uint64(NEW), np.uint64(MISSING)
NO_SLOT = np.uint64((1 << 64) - 1)


def _tables_below(mem: WritableMemory, geometry: Geometry, vas: np.ndarray, slots: np.ndarray, depth: int,
                  may_create: bool, created: list[tuple[int, int, int]]) -> np.ndarray:
    """The table each va's entry at slot points at; a missing one becomes a placeholder."""
    heads = np.flatnonzero(np.append(True, slots[1:] != slots[:-1]))  # consecutive runs mostly share a slot
    distinct, first, inverse = sorted_unique(slots[heads], first=True, inverse=True)
    below = np.empty(len(distinct), dtype=np.uint64)
    for j, slot in enumerate(distinct.tolist()):
        if slot & (NEW | MISSING):
            value = 0  # under a table this batch creates (or may not): nothing yet
        else:
            value = mem.read_entry(slot)
            if value & e.P and value & e.PS and depth < geometry.levels - 1:
                raise LargePageInTheWay(f"{int(vas[heads[first[j]]]):#x}: a {geometry.names[depth]} leaf "
                                        f"maps it already")
        if value & e.P:
            below[j] = e.frame_address(value)
        elif may_create and not slot & MISSING:
            below[j] = NEW | (len(created) << e.PAGE_SHIFT)
            created.append((int(heads[first[j]]), depth, slot))
        else:
            below[j] = _MISSING
    return np.repeat(below[inverse], np.diff(np.append(heads, len(vas))))


def _create(mem: WritableMemory, created: list[tuple[int, int, int]], alloc: AllocTable,
            table_flags: int) -> np.ndarray:
    """Allocate the placeholders' tables in one-at-a-time order and link them; their addresses."""
    pas = np.zeros(len(created), dtype=np.uint64)
    for n in sorted(range(len(created)), key=lambda n: created[n][:2]):
        pas[n] = alloc()
    parents = _resolve(np.array([parent for _, _, parent in created], dtype=np.uint64), pas)
    for parent, pa in zip(parents.tolist(), pas.tolist()):
        mem.write_entry(parent, pa | table_flags)
    return pas


def _resolve(slots: np.ndarray, pas: np.ndarray) -> np.ndarray:
    """Placeholder slots replaced by the created tables' real addresses."""
    new = (slots & _NEW) != 0
    if new.any():
        slots = slots.copy()
        number = ((slots[new] & ~_NEW) >> np.uint64(e.PAGE_SHIFT)).astype(np.intp)
        slots[new] = pas[number] + (slots[new] & np.uint64(e.PAGE_SIZE - 1))
    return slots
