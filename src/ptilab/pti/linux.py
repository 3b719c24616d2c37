"""What Linux shipped (4.15+, arch/x86/mm/pti.c pti_clone_user_shared()):
the cpu_entry_area has a P4D entry of its own, and the user PGD simply copies
it, sharing every table below. Where the area shares its P4D with the rest of
the kernel (the 2017 fixmap), Linux's 32-bit fallback applies: share at PMD
level with the PTE tables preallocated (setup_cpu_entry_area_ptes())."""

from __future__ import annotations

from ptilab.pti.shared_pmd import SharedPmdDesign


class LinuxDesign(SharedPmdDesign):
    name = "linux"
    summary = "share the area's whole P4D entry (pti_clone_user_shared), plus entry text, espfix, cpu_tss_rw"

    def on_pti_init(self) -> None:
        k = self.k
        if k.profile.in_fixmap:
            super().on_pti_init()
            return
        self.clone_p4d(k.area_base)
        self.clone_common()
