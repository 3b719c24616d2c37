"""Kernel layout profiles: what struct cpu_entry_area holds, where, with which rights.

Offsets are from each CPU's area. Sources: the seed (Dave Hansen's list,
Nov 2017), Linux 4.15 arch/x86/include/asm/cpu_entry_area.h, Linux 6.1's
as observed on a real Debian 6.1 kernel under QEMU (see DESIGN.md), and
Linux 6.12's arch/x86/mm/cpu_entry_area.c (init_cea_offsets()), checked
against real Debian 6.12 and 7.2 boots (tests/realkernel).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ptilab.errors import UsageError, one_of
from ptilab.paging import entry as e

# The rights a piece's PTEs carry in the kernel's own tables.
RIGHTS = {
    "RO": e.PAGE_KERNEL_RO,
    "RW": e.PAGE_KERNEL,
    "RX": e.PAGE_KERNEL_ROX,
    "NONE": e.PAGE_NONE,  # PTE written, not present (perf maps the BTS/PEBS buffers later)
}

CPU_ENTRY_AREA_BASE = 0xFFFF_FE00_0000_0000
CPU_ENTRY_AREA_MAP_SIZE = 1 << 39  # P4D_SIZE on 64-bit (asm/pgtable_areas.h, 6.2+), in both paging modes
ESPFIX_BASE_ADDR = 0xFFFF_FF00_0000_0000
START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000
MODULES_END_2017 = 0xFFFF_FFFF_FF00_0000
FIXMAP_CEA_TOP_2017 = 0xFFFF_FFFF_FF40_0000  # below the vsyscall page's 2 MiB and the other fixmap slots


@dataclass(frozen=True)
class Piece:
    """A run of pages of one CPU's cpu_entry_area (or of the area's header)."""

    name: str  # the struct cpu_entry_area member, e.g. "gdt", "estacks.DF_stack"
    kind: str  # idt, gdt, entry_stack, tss, entry_trampoline, exception_stack, debug_store, debug_buffers
    offset: int  # bytes from the CPU's area (or from the area base for header pieces)
    pages: int
    rights: str  # key of RIGHTS
    backing: str  # what the pages alias: a per-CPU variable, a kernel symbol, or "" for none


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    header: tuple[Piece, ...]  # pieces mapped once at the area base (the RO IDT)
    per_cpu: tuple[Piece, ...]
    stride: int  # bytes per CPU (sizeof(struct cpu_entry_area))
    first_cpu_offset: int  # where CPU 0's area starts, from the area base
    levels: tuple[int, ...]  # paging modes the profile exists for
    in_fixmap: bool  # 2017: the area lived in the fixmap; 4.15 moved it to its own P4D
    cea_at_boot: bool  # True: setup_cpu_entry_areas() maps all possible CPUs in trap_init()
    global_cea: bool  # CEA PTEs carry _PAGE_GLOBAL (4.17+)
    clone_cpu_tss_rw: bool  # pti_clone_user_shared() maps each CPU's cpu_tss_rw (SYSCALL64 scratch)
    percpu_unit_pages: int = 64
    # 6.2+: with KASLR, init_cea_offsets() gives each possible CPU a random,
    # distinct slot of the area's 512 GiB (the RO IDT page stays at the base).
    random_cea_slots: bool = False

    def area_base(self, nr_cpus: int) -> int:
        if not self.in_fixmap:
            return CPU_ENTRY_AREA_BASE
        # Fixmap indices grow downwards from the top; the area is PMD-aligned
        # (as the seed proposes) so every design can be placed over it.
        size = self.area_size(nr_cpus)
        return (FIXMAP_CEA_TOP_2017 - size) & ~((1 << 21) - 1)

    def area_size(self, nr_cpus: int) -> int:
        return self.first_cpu_offset + nr_cpus * self.stride

    def max_cea(self) -> int:
        """init_cea_offsets()'s max_cea: how many slots the area has room for."""
        return (CPU_ENTRY_AREA_MAP_SIZE - e.PAGE_SIZE) // self.stride

    def cpu_base(self, nr_cpus: int, cpu: int, slot: int | None = None) -> int:
        """Where CPU cpu's area starts: get_cpu_entry_area(), with slot the
        CPU's cea_offset() (cpu itself unless the slots are randomised)."""
        return self.area_base(nr_cpus) + self.first_cpu_offset + (cpu if slot is None else slot) * self.stride

    def check(self, nr_cpus: int, levels: int) -> None:
        if levels not in self.levels:
            modes = " or ".join(f"{n}-level" for n in self.levels)
            raise UsageError(f"profile {self.name} has no {levels}-level layout (it has {modes})")
        if self.in_fixmap and self.area_base(nr_cpus) < MODULES_END_2017:
            room = (FIXMAP_CEA_TOP_2017 - MODULES_END_2017 - self.first_cpu_offset) // self.stride
            raise UsageError(f"profile {self.name} keeps the cpu_entry_area in the fixmap, which has room for "
                             f"{room} CPUs, not {nr_cpus} (Linux 4.15 moved it to a P4D of its own)")

    def with_changes(self, **changes) -> "Profile":
        return replace(self, **changes)


def _pieces(*rows: tuple[str, str, int, int, str, str]) -> tuple[Piece, ...]:
    return tuple(Piece(*row) for row in rows)


P = 0x1000

KAISER_2017 = Profile(
    name="kaiser-2017",
    description="the seed's era (Nov 2017): area in the fixmap, set up per CPU in cpu_init(); "
                "GDT RO, TSS RW (the trampoline stack lived in it), entry trampoline RX, exception stacks RW",
    header=(),
    per_cpu=_pieces(
        ("gdt", "gdt", 0, 1, "RO", "gdt_page"),
        ("tss", "tss", 1 * P, 3, "RW", "cpu_tss_rw"),
        ("entry_trampoline", "entry_trampoline", 4 * P, 1, "RX", "_entry_trampoline"),
        ("exception_stacks", "exception_stack", 5 * P, 5, "RW", "exception_stacks"),
    ),
    stride=10 * P,
    first_cpu_offset=0,
    levels=(4,),
    in_fixmap=True,
    cea_at_boot=False,
    global_cea=False,
    clone_cpu_tss_rw=False,
)

LINUX_4_15 = Profile(
    name="linux-4.15",
    description="Linux 4.15 as merged: area at 0xfffffe0000000000 with the RO IDT first; "
                "entry stack page RW, TSS RO, trampoline RX, exception stacks RW without guards, "
                "debug store RW, BTS/PEBS buffers PAGE_NONE; no global pages",
    header=_pieces(("idt", "idt", 0, 1, "RO", "idt_table")),
    per_cpu=_pieces(
        ("gdt", "gdt", 0, 1, "RO", "gdt_page"),
        ("entry_stack_page", "entry_stack", 1 * P, 1, "RW", "entry_stack_storage"),
        ("tss", "tss", 2 * P, 3, "RO", "cpu_tss_rw"),
        ("entry_trampoline", "entry_trampoline", 5 * P, 1, "RX", "_entry_trampoline"),
        ("exception_stacks", "exception_stack", 6 * P, 5, "RW", "exception_stacks"),
        ("cpu_debug_store", "debug_store", 11 * P, 1, "RW", "cpu_debug_store"),
        ("cpu_debug_buffers", "debug_buffers", 12 * P, 32, "NONE", ""),
    ),
    stride=44 * P,
    first_cpu_offset=P,
    levels=(4, 5),
    in_fixmap=False,
    cea_at_boot=True,
    global_cea=False,
    clone_cpu_tss_rw=False,
)

# 6.1: struct cea_exception_stacks puts a guard page below each stack; the
# VC/VC2 stacks exist in the layout but are mapped only with SEV-ES.
LINUX_6_1 = Profile(
    name="linux-6.1",
    description="Linux 6.1 (Debian bookworm) as observed under QEMU: RO IDT first; GDT RO, entry stack RW, "
                "TSS 5 pages RO, IST stacks DF/NMI/DB/MCE 2 pages RW each behind guard pages, debug store RW, "
                "BTS/PEBS PAGE_NONE; stride 0x3b000; CEA PTEs global; each CPU's cpu_tss_rw cloned",
    header=_pieces(("idt", "idt", 0, 1, "RO", "idt_table")),
    per_cpu=_pieces(
        ("gdt", "gdt", 0x0000, 1, "RO", "gdt_page"),
        ("entry_stack_page", "entry_stack", 0x1000, 1, "RW", "entry_stack_storage"),
        ("tss", "tss", 0x2000, 5, "RO", "cpu_tss_rw"),
        ("estacks.DF_stack", "exception_stack", 0x8000, 2, "RW", "exception_stacks+0x0000"),
        ("estacks.NMI_stack", "exception_stack", 0xB000, 2, "RW", "exception_stacks+0x2000"),
        ("estacks.DB_stack", "exception_stack", 0xE000, 2, "RW", "exception_stacks+0x4000"),
        ("estacks.MCE_stack", "exception_stack", 0x11000, 2, "RW", "exception_stacks+0x6000"),
        ("cpu_debug_store", "debug_store", 0x1A000, 1, "RW", "cpu_debug_store"),
        ("cpu_debug_buffers", "debug_buffers", 0x1B000, 32, "NONE", ""),
    ),
    stride=0x3B000,
    first_cpu_offset=P,
    levels=(4, 5),
    in_fixmap=False,
    cea_at_boot=True,
    global_cea=True,
    clone_cpu_tss_rw=True,
)

# 6.12: struct cpu_entry_area as in 6.1 (real Debian 6.12 and 7.2 boots: the
# same pieces, offsets, rights and stride), but since 6.2 each CPU's area sits
# at get_cpu_entry_area() = CPU_ENTRY_AREA_PER_CPU + cea_offset(cpu) * stride.
LINUX_6_12 = replace(
    LINUX_6_1,
    name="linux-6.12",
    description="Linux 6.12 (Debian trixie): 6.1's struct cpu_entry_area (stride 0x3b000), but with KASLR "
                "init_cea_offsets() puts each possible CPU at a random, distinct one of the area's "
                f"{(CPU_ENTRY_AREA_MAP_SIZE - P) // 0x3B000} slots; the RO IDT page stays at the base",
    random_cea_slots=True,
)

PROFILES = {p.name: p for p in (KAISER_2017, LINUX_4_15, LINUX_6_1, LINUX_6_12)}


def get_profile(name: str) -> Profile:
    return one_of(PROFILES, name, "kernel profile")
