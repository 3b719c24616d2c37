"""Where a real kernel put what KASLR moves, and whether it has ESPfix: what ptdump's markers need.

CONFIG_RANDOMIZE_MEMORY (arch/x86/mm/kaslr.c, kernel_randomize_memory())
places three regions, in this order, between __PAGE_OFFSET_BASE_L4/L5 and
CPU_ENTRY_AREA_BASE: the direct map (page_offset_base), vmalloc
(vmalloc_base) and the vmemmap (vmemmap_base), each at a random PUD-aligned
(1 GiB) address after the previous one's end plus padding. Found, most
exact first:

- from the symbols: page_offset_base, vmalloc_base and vmemmap_base are
  variables; their values are read through the kernel view;
- from the kernel tables: the direct map is linear, so the first mapping
  above the region's start gives page_offset_base = va - pa; vmalloc
  hands out its lowest addresses first (alloc_vmap_area() from
  VMALLOC_START), so the first mapping past the direct map that is not
  linear opens vmalloc, rounded down to its PUD; the vmemmap maps struct
  page with 2 MiB pages (vmemmap_populate_hugepages()) from pfn 0's at
  vmemmap_base, the highest such cluster below the cpu_entry_area.

ESPfix (CONFIG_X86_ESPFIX64) maps its stacks in a top-level slot of its own
(ESPFIX_BASE_ADDR, init_espfix_bsp() at boot, shared by the user tables):
a kernel without it (Debian's cloud flavour) leaves the slot empty, and its
ptdump has no `ESPfix Area` marker.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ptilab.errors import InputError
from ptilab.linux.profiles import CPU_ENTRY_AREA_BASE, ESPFIX_BASE_ADDR
from ptilab.memory.physical import PhysicalMemory
from ptilab.paging import Geometry, PageFault, Walk, translate
from ptilab.paging import entry as e

PUD_SIZE = 1 << 30
P4D_SIZE = 1 << 39
TB = 1 << 40
# __PAGE_OFFSET_BASE_L4 / _L5: where kernel_randomize_memory() starts, and the nokaslr bases.
PAGE_OFFSET_BASE = {4: 0xFFFF_8880_0000_0000, 5: 0xFF11_0000_0000_0000}
NOKASLR_BASES = {
    4: {"page_offset_base": 0xFFFF_8880_0000_0000, "vmalloc_base": 0xFFFF_C900_0000_0000,
        "vmemmap_base": 0xFFFF_EA00_0000_0000},
    5: {"page_offset_base": 0xFF11_0000_0000_0000, "vmalloc_base": 0xFFA0_0000_0000_0000,
        "vmemmap_base": 0xFFD4_0000_0000_0000},
}
BASE_NAMES = ("page_offset_base", "vmalloc_base", "vmemmap_base")


@dataclass(frozen=True)
class MemoryLayout:
    """The three randomised bases (kaslr_regions[]) and where they came from."""

    page_offset_base: int
    vmalloc_base: int
    vmemmap_base: int
    source: str

    def bases(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in BASE_NAMES}


def _present_in(w: Walk, start: int, end: int) -> np.ndarray:
    r = w.ranges_within(start, end)
    return r[(r["prot"] & np.uint64(e.P)) != 0]


def layout_from_tables(kernel: Walk) -> MemoryLayout | None:
    """The bases as the kernel view's mappings show them (see the module
    docstring); None when the view maps nothing there (a user view)."""
    levels = kernel.geometry.levels
    m = _present_in(kernel, PAGE_OFFSET_BASE[levels], CPU_ENTRY_AREA_BASE)
    if not len(m):
        return None
    va, pa = m["va"].astype(object), m["pa"].astype(object)
    page_offset = int(va[0] - pa[0])
    if page_offset % PUD_SIZE:
        return None
    linear = (va - pa) == page_offset
    after = np.flatnonzero(~linear.astype(bool))
    pmd_leaves = np.flatnonzero((m["size"] % np.uint64(1 << 21) == 0) & (m["va"] % np.uint64(1 << 21) == 0)
                                & ~linear.astype(bool))
    if not len(after) or not len(pmd_leaves):
        return None
    vmalloc = int(m["va"][after[0]]) & ~(PUD_SIZE - 1)
    top = int(m["va"][pmd_leaves[-1]])
    # The vmemmap spans at most a few TiB (kaslr.c: DIV_ROUND_UP(vmemmap_size, 1 TB)); vmalloc's own
    # huge mappings sit near vmalloc_base, at least VMALLOC_SIZE_TB below.
    cluster = m["va"][pmd_leaves][m["va"][pmd_leaves] >= np.uint64(max(top - TB, vmalloc + 1))]
    vmemmap = int(cluster[0]) & ~(PUD_SIZE - 1)
    if not page_offset < vmalloc < vmemmap:
        return None
    return MemoryLayout(page_offset, vmalloc, vmemmap, "the kernel page tables")


def layout_from_symbols(mem: PhysicalMemory, kernel_cr3: int, geometry: Geometry,
                        symbols: dict[str, int]) -> MemoryLayout | None:
    """The bases read from the variables the symbols (of this boot: slid) name; None without them."""
    if not all(name in symbols for name in BASE_NAMES):
        return None
    values = []
    for name in BASE_NAMES:
        try:
            t = translate(mem, kernel_cr3, symbols[name], geometry)
        except PageFault:
            raise InputError(f"{name} at {symbols[name]:#x} is not mapped in the kernel view: "
                             f"are the symbols of this boot (KASLR slid)?") from None
        values.append(int.from_bytes(mem.read(t.pa, 8), "little"))
    if any(v % PUD_SIZE or v < PAGE_OFFSET_BASE[geometry.levels] or v >= CPU_ENTRY_AREA_BASE for v in values):
        raise InputError(f"{', '.join(f'{n}={v:#x}' for n, v in zip(BASE_NAMES, values))}: not the PUD-aligned "
                         f"kernel addresses kernel_randomize_memory() sets: are the symbols of this boot?")
    return MemoryLayout(*values, "the kernel's variables (symbols)")


def has_espfix(w: Walk) -> bool:
    """Whether ESPfix's top-level slot maps anything (either view: the user tables share it)."""
    return bool(len(_present_in(w, ESPFIX_BASE_ADDR, ESPFIX_BASE_ADDR + P4D_SIZE)))
