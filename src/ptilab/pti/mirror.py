"""Design 2, Andy Lutomirski's first suggestion: right after the kernel has
set up a CPU's cpu_entry_area, walk it page by page and install exactly the
kernel's PTEs into the user tables. Rights follow the kernel; the user side
still owns its page tables and redoes the work for every AP."""

from __future__ import annotations

from ptilab.paging import entry as e
from ptilab.pti.design import Design


class MirrorDesign(Design):
    name = "mirror"
    summary = "copy the kernel's cpu_entry_area PTEs page by page, per CPU"

    def on_area_ready(self, cpu: int | None, start: int, end: int) -> None:
        k = self.k
        depth = k.geometry.levels - 1
        for va in range(start, end, e.PAGE_SIZE):
            kernel_slot = k.kernel_entry(va, depth)
            if kernel_slot is None:
                continue
            pte = k.ram.read_entry(kernel_slot)
            if pte:  # PAGE_NONE entries too: perf may make them present later
                self.write(self.user_entry(va, depth, "user pte table for cpu_entry_area"), pte)

    def on_pti_init(self) -> None:
        self.clone_common()
