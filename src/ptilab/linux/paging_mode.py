"""4-level or 5-level paging for a Linux image: from what the dump says, never guessed silently.

A tree walked at the wrong depth still walks: its entries are read one level
off, and the result is nonsense that looks like tables (user-accessible
kernel pages, W+X everywhere). So the mode comes from evidence, strongest
first:

1. the CPU notes of a QEMU core: CR4.LA57 of the CPU running on this PGD pair,
   or of every CPU when they all agree (Linux sets LA57 on all or none);
2. VMCOREINFO's ``NUMBER(pgtable_l5_enabled)`` (kdump vmcores, QEMU cores of
   guests with a vmcoreinfo device);
3. the tables themselves: every x86-64 Linux since 4.15 maps the read-only
   IDT page at the base of the cpu_entry_area, 0xfffffe0000000000, in both
   views and both modes (kernel 6.2+ randomises the per-CPU areas, not the
   IDT's page). Walked at the wrong depth that address lands in an empty slot
   (PML5 slot 508 or P4D slot 508 of the kernel-text PDPT), so exactly one
   depth maps it.

An explicit --la57/--no-la57 that the notes or VMCOREINFO contradict is
refused: the dump records what the CPU ran, and a walk against it can only
print nonsense. Without notes, an explicit mode the tables contradict is
refused too; with no evidence at all (not a Linux tree) the given or default
mode is used, once its top level passes the SDM's reserved-bit rule.
"""

from __future__ import annotations

import numpy as np

from ptilab.errors import FrameOutsideMemory, InputError, UsageError
from ptilab.memory.physical import PhysicalMemory
from ptilab.memory.vmcoreinfo import START_KERNEL_MAP
from ptilab.paging import CR3, Geometry, PageFault, translate
from ptilab.paging import entry as e
from ptilab.paging.cr3 import PTI_USER_PGTABLE_BIT

# The IDT page of the cpu_entry_area (CPU_ENTRY_AREA_RO_IDT): the same address with 4 and 5 levels.
CEA_RO_IDT = 0xFFFF_FE00_0000_0000
VMCOREINFO_L5 = "NUMBER(pgtable_l5_enabled)"


def _mode_name(la57: bool) -> str:
    return "5-level paging (LA57)" if la57 else "4-level paging"


def _option(la57: bool) -> str:
    return "--la57" if la57 else "--no-la57"


def la57_from_notes(mem: PhysicalMemory, cr3: int) -> tuple[bool, str] | None:
    """CR4.LA57 from a QEMU core's CPU notes, and which CPU(s) said it; None
    when the image has no notes or its CPUs disagree and none runs on cr3."""
    cpus = mem.cpus
    pair = CR3(cr3).pgd & ~(1 << PTI_USER_PGTABLE_BIT)
    for cpu in cpus:
        if CR3(cpu.cr3).pgd & ~(1 << PTI_USER_PGTABLE_BIT) == pair:
            return cpu.geometry.levels == 5, f"the core's CPU {cpu.index} notes (CR4 {cpu.cr4:#x}, on this PGD pair)"
    modes = {cpu.geometry.levels == 5 for cpu in cpus}
    if len(modes) == 1:
        return modes.pop(), f"the core's notes of all {len(cpus)} CPU(s)"
    return None


def la57_from_vmcoreinfo(mem: PhysicalMemory) -> tuple[bool, str] | None:
    """pgtable_l5_enabled from the dump's VMCOREINFO note, when it has one that says.

    The note only: a copy found in memory would cost a pass over the image,
    and the tables already tell the depth as surely (rule 3)."""
    info = mem.vmcoreinfo if mem.vmcoreinfo_text else None
    if info is None or VMCOREINFO_L5 not in info.entries:
        return None
    return info.pgtable_l5_enabled, f"VMCOREINFO ({VMCOREINFO_L5}={info.entries[VMCOREINFO_L5]})"


def maps_cpu_entry_area(mem: PhysicalMemory, cr3: int, geometry: Geometry) -> bool:
    """Whether the tree, walked at this depth, maps the cpu_entry_area's IDT page."""
    try:
        translate(mem, CR3(cr3), CEA_RO_IDT, geometry)
    except (PageFault, FrameOutsideMemory):
        return False
    return True


def _check_top_level(mem: PhysicalMemory, cr3: int, geometry: Geometry) -> None:
    """PS is reserved in a PML4E and a PML5E (SDM 4.5): a top level with it set is not one."""
    try:
        table = mem.read_frame(CR3(cr3).pgd >> e.PAGE_SHIFT)
    except FrameOutsideMemory:
        return  # the walk says so, in its own words
    bad = np.flatnonzero(((table & np.uint64(e.P)) != 0) & ((table & np.uint64(e.PS)) != 0)).tolist()
    if bad:
        raise InputError(f"CR3 {cr3:#x}: {len(bad)} top-level entries (slots {', '.join(map(str, bad[:4]))}) "
                         f"set PS, reserved in a {'PML5E' if geometry.levels == 5 else 'PML4E'}: "
                         f"not a {geometry.levels}-level table")


def paging_mode(mem: PhysicalMemory, cr3: int, la57: bool | None = None) -> Geometry:
    """The paging mode to walk cr3 in: la57 is the user's --la57 (True),
    --no-la57 (False) or neither (None). Raises UsageError when la57
    contradicts the dump's notes, InputError when the tables contradict the
    mode chosen (see the module docstring for the order of evidence)."""
    said = la57_from_notes(mem, cr3) or la57_from_vmcoreinfo(mem)
    if said is not None:
        mode, source = said
        if la57 is not None and la57 != mode:
            raise UsageError(f"{_option(la57)}: {source} say{'s' if source.startswith('VMCORE') else ''} "
                             f"{_mode_name(mode)}; drop {_option(la57)}")
        return Geometry(5 if mode else 4)
    fits = {la57_: maps_cpu_entry_area(mem, cr3, Geometry(5 if la57_ else 4)) for la57_ in (False, True)}
    if fits[False] != fits[True]:
        mode = fits[True]
        if la57 is not None and la57 != mode:
            raise InputError(f"{_option(la57)}: the tables at CR3 {cr3:#x} map the cpu_entry_area "
                             f"({CEA_RO_IDT:#x}) only when walked with {_mode_name(mode)}")
        return Geometry(5 if mode else 4)
    geometry = Geometry(5 if la57 else 4)
    _check_top_level(mem, cr3, geometry)
    return geometry


def image_root(mem: PhysicalMemory, image: str, cpu: int | None = None,
               la57: bool | None = None) -> tuple[int, Geometry]:
    """The CR3 to judge in an image given without --cr3, and its paging mode:
    CPU cpu's from QEMU's per-CPU notes (by default a CPU in user mode, else
    CPU 0), or, in a dump without CPU notes (kdump's vmcore, LiME, raw),
    init_mm's kernel PGD from VMCOREINFO's init_top_pgt: the dump's note,
    else the kernel's copy found in its memory (the audit finds the user twin)."""
    cpus = mem.cpus
    if not cpus and cpu is None:
        info = mem.vmcoreinfo
        if info is None:
            raise InputError(f"{image} carries no CPU registers and no VMCOREINFO (no note, none found in its "
                             f"memory): give --cr3, init_mm's PGD: init_top_pgt as the same boot's other dumps "
                             f"print it, or System.map's init_top_pgt - {START_KERNEL_MAP:#x} "
                             f"(__START_KERNEL_map) + phys_base (0 without KASLR)")
        cr3 = info.kernel_pgd
    else:
        if not cpus:
            raise InputError(f"{image} carries no CPU registers: --cpu needs a QEMU core's CPU notes")
        if cpu is None:
            cpu = next((c.index for c in cpus if c.cpl == 3), 0)
        if not 0 <= cpu < len(cpus):
            raise UsageError(f"--cpu {cpu}: the core holds CPUs 0 to {len(cpus) - 1}")
        cr3 = cpus[cpu].cr3
    return cr3, paging_mode(mem, cr3, la57)
