"""Design 2, Andy Lutomirski's first suggestion: right after the kernel has
set up a CPU's cpu_entry_area, walk it page by page and install exactly the
kernel's PTEs into the user tables. Rights follow the kernel; the user side
still owns its page tables and redoes the work for every AP."""

from __future__ import annotations

import numpy as np

from ptilab.paging import entry as e
from ptilab.paging.install import table_runs
from ptilab.pti.design import Design


class MirrorDesign(Design):
    name = "mirror"
    summary = "copy the kernel's cpu_entry_area PTEs page by page, per CPU"

    def on_area_ready(self, cpu: int | None, start: int, end: int) -> None:
        k = self.k
        depth = k.geometry.levels - 1
        count = (end - start) // e.PAGE_SIZE
        # Page by page in effect; a kernel PTE table at a time in the model.
        for slot, first, n in table_runs(k.ram, k.geometry, k.kernel_pgd, start, count, depth):
            frame = k.ram.read_frame(slot >> e.PAGE_SHIFT)
            index = (slot & (e.PAGE_SIZE - 1)) >> 3
            ptes = frame[index:index + n]
            # PAGE_NONE entries too: perf may make them present later.
            self.set_user_ptes(start + first * e.PAGE_SIZE, ptes.copy(), "user pte table for cpu_entry_area")

    def on_pti_init(self) -> None:
        self.clone_common()
