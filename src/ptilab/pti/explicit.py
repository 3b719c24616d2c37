"""Design 1, the patch under review (KAISER, Nov 2017): map each piece of a
CPU's area with permissions written into the design, CPU 0 early from
memblock (kaiser_add_user_map_early()) and every AP again when it comes up.

The constants are Dave Hansen's list in the seed. Pieces the list does not
know (the entry stack page, the IDT, the debug store) are not mapped at all.
"""

from __future__ import annotations

import numpy as np

from ptilab.memory.allocators import Allocator
from ptilab.paging import entry as e
from ptilab.pti.design import Design

PIECE_RIGHTS_2017 = {
    "gdt": e.P | e.A | e.NX,  # GDT: R/O
    "tss": e.P | e.RW | e.A | e.D | e.NX,  # TSS: R/W at least because of trampoline stack
    "entry_trampoline": e.P | e.A,  # entry code: EXEC+R/O
    "exception_stack": e.P | e.RW | e.A | e.D | e.NX,  # exception stacks: R/W
}


class ExplicitDesign(Design):
    name = "explicit"
    summary = "map each piece with hard-coded rights; CPU 0 early (memblock), each AP again"
    early_allocator = Allocator.MEMBLOCK

    def attach(self, kernel) -> None:
        super().attach(kernel)
        self._area_ptes = None  # stamped at the first area, once the percpu chunk is placed

    def on_area_ready(self, cpus: np.ndarray | None, starts: np.ndarray, size: int) -> None:
        if cpus is None:
            return  # the header pieces are not on the 2017 list
        if self._area_ptes is None:
            self._area_ptes = self.k.area_stamp(self._ptes)  # the list's pieces walked once per boot
        self.set_user_ptes(starts, self._area_ptes(cpus), "user pte table for cpu_entry_area pieces")

    def _ptes(self, piece, cpu: int) -> np.ndarray | None:
        flags = PIECE_RIGHTS_2017.get(piece.kind)
        if flags is None:
            return None
        first = self.k.backing_pa(piece, cpu)
        return np.arange(first, first + piece.pages * e.PAGE_SIZE, e.PAGE_SIZE, dtype=np.uint64) | np.uint64(flags)

    def on_pti_init(self) -> None:
        self.clone_common()
