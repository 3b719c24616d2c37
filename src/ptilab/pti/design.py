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
from ptilab.paging.install import entry_address, page_vas

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
    def on_area_ready(self, cpus: np.ndarray | None, starts: np.ndarray, size: int) -> None:
        """The kernel has just mapped the cpu_entry_area of cpus, each
        [start, start + size) for the start beside it in starts, or the area's
        header (the RO IDT) when cpus is None: in trap_init() every possible
        CPU at once, in cpu_init() one AP (the 2017 fixmap)."""

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

    def set_user_ptes(self, starts: np.ndarray, ptes: np.ndarray, purpose: str) -> None:
        """Install each area's user PTEs (row i of ptes, consecutive pages from
        starts[i] on), one area after the other; zero entries at either end of
        a row are not written (no table is made for them)."""
        nonzero = ptes != 0
        pages = np.arange(ptes.shape[1])
        first = nonzero.argmax(axis=1)[:, None]
        last = ptes.shape[1] - 1 - nonzero[:, ::-1].argmax(axis=1)[:, None]
        keep = nonzero.any(axis=1)[:, None] & (pages >= first) & (pages <= last)
        vas = page_vas(starts, ptes.shape[1])
        self.k.install(self.name, self.k.user_pgd, vas[keep], ptes[keep], self._user_alloc(purpose))

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
            pas = k.percpu_pa(np.arange(k.nr_cpus, dtype=np.uint64), "cpu_tss_rw")
            # pfn_pte(pa, PAGE_KERNEL): under PTI __default_kernel_pte_mask strips _PAGE_GLOBAL.
            flags = np.uint64(e.PAGE_KERNEL & ~e.G)
            k.install(self.name, k.user_pgd, k.direct_map_va(pas), pas | flags,
                      self._user_alloc("user pte for cpu_tss_rw"))
