"""Design 2, Andy Lutomirski's first suggestion: right after the kernel has
set up a CPU's cpu_entry_area, walk it page by page and install exactly the
kernel's PTEs into the user tables. Rights follow the kernel; the user side
still owns its page tables and redoes the work for every AP."""

from __future__ import annotations

import numpy as np

from ptilab.paging import entry as e
from ptilab.paging.install import page_vas, read_entries
from ptilab.pti.design import Design


class MirrorDesign(Design):
    name = "mirror"
    summary = "copy the kernel's cpu_entry_area PTEs page by page, per CPU"

    def on_area_ready(self, cpus: np.ndarray | None, starts: np.ndarray, size: int) -> None:
        k = self.k
        vas = page_vas(starts, size // e.PAGE_SIZE)
        # Page by page in effect, PAGE_NONE entries too (perf may make them present later).
        ptes = read_entries(k.ram, k.geometry, k.kernel_pgd, vas.ravel(), k.geometry.levels - 1)
        self.set_user_ptes(starts, ptes.reshape(vas.shape), "user pte table for cpu_entry_area")

    def on_pti_init(self) -> None:
        self.clone_common()
