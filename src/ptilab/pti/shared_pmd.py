"""Design 3, Andy Lutomirski's "fancier" suggestion: align the area to a PMD
boundary, preallocate its PTE tables for every possible CPU before any AP
boots, and point the user PMD entries at the very same tables. No AP work;
the TLB refill reads the same cache lines in both views."""

from __future__ import annotations

from ptilab.errors import UsageError
from ptilab.paging import entry as e
from ptilab.pti.design import Design

PMD_SIZE = 1 << 21


class SharedPmdDesign(Design):
    name = "shared-pmd"
    summary = "PMD-aligned area, PTE tables preallocated before APs, shared by the user PMDs"

    def on_pti_init(self) -> None:
        k = self.k
        start = k.area_base
        end = start + k.profile.area_size(k.nr_cpus)
        if start % PMD_SIZE:
            raise UsageError(f"design {self.name} needs the cpu_entry_area on a PMD boundary, "
                             f"but {k.profile.name} puts it at {start:#x}")
        self.preallocate_pte_tables(start, end)
        self.clone_pmds(start, end, "user pmd for cpu_entry_area", set_global=False)
        self.clone_common()

    def preallocate_pte_tables(self, start: int, end: int) -> None:
        """setup_cpu_entry_area_ptes(): every PTE table of the area exists
        before any AP, so later PTEs land in tables the user side already sees."""
        k = self.k
        alloc = self._counting(k.table_allocator(self.name, "kernel pte table preallocated for cpu_entry_area"))
        from ptilab.paging.install import entry_address
        for va in range(start, end + PMD_SIZE - 1 & ~(PMD_SIZE - 1), PMD_SIZE):
            entry_address(k.ram, k.geometry, k.kernel_pgd, va, k.geometry.levels - 1, alloc)
