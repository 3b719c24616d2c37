"""Design 3, Andy Lutomirski's "fancier" suggestion: align the area to a PMD
boundary, preallocate its PTE tables for every possible CPU before any AP
boots, and point the user PMD entries at the very same tables. No AP work;
the TLB refill reads the same cache lines in both views.

With 6.2+'s random slots (linux-6.12 with KASLR) the area is no longer one
run of PMDs: each CPU's slot lies alone somewhere in 512 GiB, so the design
shares one or two PMD entries per CPU, under user PMD tables of its own (one
per GiB the slots touch). It still works, but only because
init_cea_offsets() draws every possible CPU's slot before the first PTE is
written: the tables to preallocate are the slots' tables, known in trap_init().
"""

from __future__ import annotations

from ptilab.errors import UsageError
from ptilab.paging.install import entry_address
from ptilab.pti.design import Design

PMD_SIZE = 1 << 21


class SharedPmdDesign(Design):
    name = "shared-pmd"
    summary = "PMD-aligned area, PTE tables preallocated before APs, shared by the user PMDs"

    def on_pti_init(self) -> None:
        k = self.k
        if k.area_base % PMD_SIZE:
            raise UsageError(f"design {self.name} needs the cpu_entry_area on a PMD boundary, "
                             f"but {k.profile.name} puts it at {k.area_base:#x}")
        pmds = k.area_pmds()
        self.preallocate_pte_tables(pmds)
        self.share_pmds(pmds, "user pmd for cpu_entry_area")
        self.clone_common()

    def preallocate_pte_tables(self, pmds: list[int]) -> None:
        """setup_cpu_entry_area_ptes(): every PTE table of the area exists
        before any AP, so later PTEs land in tables the user side already sees."""
        k = self.k
        alloc = self._counting(k.table_allocator(self.name, "kernel table preallocated for cpu_entry_area"))
        for va in pmds:
            entry_address(k.ram, k.geometry, k.kernel_pgd, va, k.geometry.levels - 1, alloc)

    def share_pmds(self, pmds: list[int], purpose: str) -> None:
        """Point the user PMD entries at the kernel's PTE tables, one per PMD in pmds."""
        for va in pmds:
            self.clone_pmds(va, va + PMD_SIZE, purpose, set_global=False)
