"""Bits of a page-table entry, as Intel SDM vol. 3 ch. 4.5 (tables 4-15..4-20) defines them.

Names follow Linux's arch/x86/include/asm/pgtable_types.h (_PAGE_BIT_*), since
ptilab speaks of Linux page tables; the meaning is the hardware's.
"""

from __future__ import annotations

P = 1 << 0  # present
RW = 1 << 1  # writable
US = 1 << 2  # user-accessible ("USR" in ptdump)
PWT = 1 << 3
PCD = 1 << 4
A = 1 << 5  # accessed
D = 1 << 6  # dirty (leaf only)
PS = 1 << 7  # page size in a PUD/PMD entry; PAT in a 4 KiB PTE
PAT_4K = PS
G = 1 << 8  # global (leaf only); Linux reuses it as _PAGE_PROTNONE when P=0
PAT_LARGE = 1 << 12  # PAT in a 2 MiB / 1 GiB leaf
PKEY_SHIFT = 59
PKEY_MASK = 0xF << PKEY_SHIFT
NX = 1 << 63

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
ENTRIES_PER_TABLE = 512

# Everything that is not the frame address: Linux's PTE_FLAGS_MASK.
PHYS_ADDR_BITS_MAX = 52
ADDRESS_MASK = ((1 << PHYS_ADDR_BITS_MAX) - 1) & ~(PAGE_SIZE - 1)
FLAGS_MASK = ~ADDRESS_MASK & 0xFFFF_FFFF_FFFF_FFFF

# Common Linux protections (6.x pgtable_types.h), used by the model.
PAGE_TABLE = P | RW | US | A | D  # _PAGE_TABLE: upper entries of the user half
KERNPG_TABLE = P | RW | A | D  # _KERNPG_TABLE: upper entries of the kernel half
PAGE_KERNEL = P | RW | A | D | G | NX
PAGE_KERNEL_RO = P | A | G | NX
PAGE_KERNEL_EXEC = P | RW | A | D | G
PAGE_KERNEL_ROX = P | A | G
PAGE_NONE = A | G  # not present: P clear, _PAGE_PROTNONE (= G) set
PAGE_KERNEL_LARGE = PAGE_KERNEL | PS
PAGE_SHARED = P | RW | US | A | NX
PAGE_USER_RX = P | US | A


def large_page_reserved(shift: int) -> int:
    """The reserved bits of a large-page entry mapping 1 << shift bytes (SDM vol. 3A
    tables 4-17 and 4-15, 2 MiB and 1 GiB pages): its address bits above PAT (bit 12)
    and below the page's alignment. One set is a reserved-bit page fault."""
    return ((1 << shift) - 1) & ~((PAT_LARGE << 1) - 1)


def frame_address(entry: int, leaf_shift: int = PAGE_SHIFT, maxphyaddr: int = PHYS_ADDR_BITS_MAX) -> int:
    """Physical address an entry points at: a table, or a page of 1 << leaf_shift bytes."""
    mask = ((1 << maxphyaddr) - 1) & ~((1 << leaf_shift) - 1)
    return entry & mask


def describe(entry: int) -> str:
    """Short human text of an entry's flags, e.g. 'P RW US A D NX'."""
    names = [("P", P), ("RW", RW), ("US", US), ("PWT", PWT), ("PCD", PCD), ("A", A),
             ("D", D), ("PS", PS), ("G", G), ("NX", NX)]
    return " ".join(n for n, bit in names if entry & bit) or "-"
