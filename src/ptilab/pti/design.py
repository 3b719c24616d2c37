"""The protocol every PTI design follows: hooks the modelled boot calls.

A design sees the kernel (ptilab.linux.kernel.Kernel) and writes the user
half of the PGD pair. Adding a design means adding one module that subclasses
Design and listing it in ptilab.pti.DESIGNS; no other design changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ptilab.memory.allocators import Allocator
from ptilab.paging import entry as e
from ptilab.paging.install import entry_address, table_runs

if TYPE_CHECKING:
    from ptilab.linux.kernel import Kernel


class Design:
    name = ""
    summary = ""
    # Which allocator the design's code calls in early boot and later; None
    # means "the one the phase provides", as careful kernel code does.
    early_allocator: Allocator | None = None

    def attach(self, kernel: "Kernel") -> None:
        self.k = kernel

    # -- hooks, in boot order -------------------------------------------------
    def on_area_ready(self, cpu: int | None, start: int, end: int) -> None:
        """The kernel has just mapped [start, end) of the cpu_entry_area: CPU
        cpu's area, or the area's header (the RO IDT) when cpu is None."""

    def on_pti_init(self) -> None:
        """pti_init(): the buddy allocator is up and no AP has booted."""

    def on_ap_online(self, cpu: int) -> None:
        """On the AP in cpu_init(), interrupts off (Phase.AP_BRINGUP)."""

    def on_ap_offline(self, cpu: int) -> None:
        """The AP went down; Linux keeps its cpu_entry_area mapped."""

    # -- the tools of pti.c ------------------------------------------------------
    def _user_alloc(self, purpose: str):
        k = self.k
        allocator = self.early_allocator if k.alloc.phase.value == "early" else None
        return self._counting(k.table_allocator(self.name, purpose, allocator))

    def user_entry(self, va: int, depth: int, purpose: str) -> int:
        """pti_user_pagetable_walk_*(): the user PGD's entry for va at depth,
        creating the user-only tables above it as _KERNPG_TABLE."""
        k = self.k
        slot = entry_address(k.ram, k.geometry, k.user_pgd, va, depth, self._user_alloc(purpose), e.KERNPG_TABLE)
        assert slot is not None
        return slot

    def set_user_ptes(self, va: int, ptes: np.ndarray, purpose: str) -> None:
        """Install consecutive user PTEs from va on, a PTE table at a time;
        zero entries at either end are not written (no table is made for them)."""
        k = self.k
        used = np.flatnonzero(ptes)
        if not len(used):
            return
        va += int(used[0]) * e.PAGE_SIZE
        ptes = ptes[used[0]:used[-1] + 1]
        for slot, first, n in table_runs(k.ram, k.geometry, k.user_pgd, va, len(ptes), k.geometry.levels - 1,
                                         self._user_alloc(purpose)):
            k.write_run(self.name, slot, ptes[first:first + n])

    def _counting(self, alloc):
        k, owner = self.k, self.name

        def counted() -> int:
            pa = alloc()
            k.writes[(owner, k.alloc.phase)] += 1  # the parent entry that links it
            return pa
        return counted

    def write(self, slot: int, value: int) -> None:
        self.k.write(self.name, slot, value)

    def clone_p4d(self, va: int) -> None:
        """pti_clone_p4d(): the user tables share everything below the
        kernel's P4D entry for va (the PGD entry with 4-level paging)."""
        k = self.k
        depth = k.geometry.levels - 4
        kernel_slot = k.kernel_entry(va, depth)
        assert kernel_slot is not None
        self.write(self.user_entry(va, depth, "user p4d"), k.ram.read_entry(kernel_slot))

    def clone_pmds(self, start: int, end: int, purpose: str, set_global: bool = True) -> int:
        """pti_clone_pgtable(..., PTI_CLONE_PMD): point the user PMD entries
        at the kernel's own PTE tables (or large pages); returns how many."""
        k = self.k
        depth = k.geometry.levels - 2
        count = 0
        va = start & ~((1 << 21) - 1)
        while va < end:
            kernel_slot = k.kernel_entry(va, depth)
            if kernel_slot is not None:
                pmd = k.ram.read_entry(kernel_slot)
                if pmd & e.P:
                    if set_global and pmd & e.PS:
                        pmd |= e.G
                        k.write(self.name, kernel_slot, pmd)
                    self.write(self.user_entry(va, depth, purpose), pmd)
                    count += 1
            va += 1 << 21
        return count

    def clone_common(self) -> None:
        """What every design maps besides the cpu_entry_area, as pti_init()
        does: the entry text (PMD level), the espfix P4D, and on 6.x each
        CPU's cpu_tss_rw page (the SYSCALL64 entry spills a register into its
        sp2 slot before it can switch CR3)."""
        from ptilab.linux.kernel import ENTRY_TEXT
        from ptilab.linux.profiles import ESPFIX_BASE_ADDR

        k = self.k
        self.clone_pmds(*ENTRY_TEXT, "user pmd for the entry text")
        self.clone_p4d(ESPFIX_BASE_ADDR)
        if k.profile.clone_cpu_tss_rw:
            for cpu in range(k.nr_cpus):
                pa = k.percpu_pa(cpu, "cpu_tss_rw")
                va = k.direct_map_va(pa)
                # pfn_pte(pa, PAGE_KERNEL): under PTI __default_kernel_pte_mask strips _PAGE_GLOBAL.
                flags = e.PAGE_KERNEL & ~e.G
                self.write(self.user_entry(va, k.geometry.levels - 1, "user pte for cpu_tss_rw"), pa | flags)
