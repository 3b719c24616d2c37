"""Linux's two page allocators and the boot-phase rules that govern them.

Early boot has only memblock (mm/memblock.c; "bootmem" in the seed); once
mm_init() hands memory to the buddy allocator, memblock is gone
(memblock_free_all). Code running on an AP while it comes up (cpu_init(),
interrupts off) may not sleep, so only GFP_ATOMIC buddy allocations are legal
there. A wrong choice is recorded as a violation: the model keeps booting, as
a kernel would until the bug bites.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ptilab.paging.entry import PAGE_SIZE


class Phase(str, Enum):
    EARLY = "early"  # start_kernel() before mm_init(): memblock only
    BOOT = "boot"  # after mm_init(), BSP still alone: buddy, may sleep
    AP_BRINGUP = "ap-bringup"  # on the AP in cpu_init(): buddy GFP_ATOMIC only
    RUNTIME = "runtime"  # all CPUs up; hotplug callbacks from process context


class Allocator(str, Enum):
    MEMBLOCK = "memblock"
    BUDDY = "buddy"


class Gfp(str, Enum):
    KERNEL = "GFP_KERNEL"  # may sleep
    ATOMIC = "GFP_ATOMIC"  # may not sleep; may fail under pressure
    NONE = "-"  # memblock takes no GFP flags


@dataclass(frozen=True)
class Allocation:
    pa: int
    pages: int
    allocator: Allocator
    gfp: Gfp
    phase: Phase
    cpu: int | None  # the CPU being brought up, if any
    owner: str  # "kernel" or a design's name
    purpose: str  # e.g. "user pmd for cpu_entry_area"
    violation: str | None  # why this allocation is a bug, if it is


def violation_for(allocator: Allocator, gfp: Gfp, phase: Phase) -> str | None:
    if allocator is Allocator.BUDDY and phase is Phase.EARLY:
        return "buddy allocation before mm_init(): the buddy allocator does not exist yet"
    if allocator is Allocator.MEMBLOCK and phase is not Phase.EARLY:
        return "memblock allocation after mm_init(): memblock has been handed to the buddy allocator"
    if allocator is Allocator.BUDDY and gfp is Gfp.KERNEL and phase is Phase.AP_BRINGUP:
        return "sleeping GFP_KERNEL allocation on an AP in cpu_init() with interrupts off"
    return None


class PhysicalAllocators:
    """memblock (top-down, as memblock allocates by default) and buddy
    (bottom-up) over one RAM.

    The kernel's own pages and a design's come from separate halves of RAM,
    so what a design allocates never moves the kernel's frames: two designs'
    views can then be compared frame for frame.
    """

    def __init__(self, ram_size: int, buddy_start: int):
        self.ram_size = ram_size
        self.phase = Phase.EARLY
        self.cpu: int | None = None
        half = ram_size // 2
        # [buddy next, memblock top] per arena: the kernel's low half, the designs' high half.
        self._cursors = {True: [buddy_start, half], False: [half, ram_size]}
        self.log: list[Allocation] = []

    def alloc(self, allocator: Allocator, gfp: Gfp, owner: str, purpose: str, pages: int = 1,
              align: int = PAGE_SIZE) -> int:
        size = pages * PAGE_SIZE
        arena = self._cursors[owner == "kernel"]
        if allocator is Allocator.MEMBLOCK:
            pa = (arena[1] - size) & ~(align - 1)
            arena[1] = pa
        else:
            pa = (arena[0] + align - 1) & ~(align - 1)
            arena[0] = pa + size
        if arena[0] > arena[1]:
            raise MemoryError(f"modelled RAM of {self.ram_size:#x} bytes is exhausted")
        self.log.append(Allocation(pa, pages, allocator, gfp, self.phase, self.cpu, owner, purpose,
                                   violation_for(allocator, gfp, self.phase)))
        return pa

    def violations(self) -> list[Allocation]:
        return [a for a in self.log if a.violation]
