"""A modelled Linux x86-64 kernel: its page tables, its boot and CPU hotplug.

The kernel builds real tables in simulated RAM, in the order start_kernel()
does: trap_init() maps the cpu_entry_area (memblock, before mm_init()), the
buddy allocator takes over, pti_init() runs, then smp_init() brings the APs
up one by one. A PTI design (ptilab.pti) is called at each step and builds
the user half of the PGD pair next to the kernel's.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Callable, Protocol

import numpy as np

from ptilab import progress
from ptilab.errors import UsageError
from ptilab.memory.allocators import Allocator, Gfp, Phase, PhysicalAllocators
from ptilab.memory.simulated import SimulatedRAM
from ptilab.paging import entry as e
from ptilab.paging.cr3 import CR3
from ptilab.paging.geometry import Geometry
from ptilab.paging.install import AllocTable, entry_address, install_entries, map_page, page_vas
from ptilab.linux.profiles import CPU_ENTRY_AREA_MAP_SIZE, ESPFIX_BASE_ADDR, RIGHTS, START_KERNEL_MAP, Piece, Profile


class PtiHooks(Protocol):
    """What the boot calls of a PTI design, in boot order (ptilab.pti.design.Design
    implements it; the kernel knows no design, as Linux's own pti_init() and
    cpu_entry_area setup call into pti.c, not the reverse)."""

    def attach(self, kernel: "Kernel") -> None: ...
    def on_area_ready(self, cpus: np.ndarray | None, starts: np.ndarray, size: int) -> None: ...
    def on_pti_init(self) -> None: ...
    def on_ap_online(self, cpu: int) -> None: ...
    def on_ap_offline(self, cpu: int) -> None: ...

NR_CPUS_MAX = 8192
PAGE_OFFSET = {4: 0xFFFF_8880_0000_0000, 5: 0xFF11_0000_0000_0000}

# The kernel image, as a nokaslr x86-64 build links and loads it.
PHYS_START = 0x100_0000
TEXT_START = START_KERNEL_MAP + PHYS_START  # _text = 0xffffffff81000000
ENTRY_TEXT = (0xFFFF_FFFF_81C0_0000, 0xFFFF_FFFF_81C0_3000)  # __entry_text_start/end
IMAGE_SIZE = 0x200_0000
SYMBOLS = {  # offsets of a few kernel-image objects from _text
    "_entry_trampoline": 0xC0_2000,
    "idt_table": 0x160_0000,
    "init_top_pgt": 0x160_2000,  # 8 KiB aligned: the kernel PGD and, at +4 KiB, its PTI user half
    "espfix_pud_page": 0x160_4000,
}
RODATA_START = TEXT_START + 0x100_0000
DATA_START = TEXT_START + 0x160_0000

# User space of the one process the model runs (an init like /bin/sh).
USER_MAPPINGS = (
    (0x40_0000, 4, e.P | e.US | e.A),  # text RX
    (0x60_0000, 2, e.P | e.US | e.RW | e.A | e.D | e.NX),  # data RW
    (0x7FFF_FFFD_E000, 3, e.P | e.US | e.RW | e.A | e.D | e.NX),  # stack RW
)

CEA_TABLE_PURPOSE = "cpu_entry_area table"  # the kernel's allocations for set_pte_vaddr() in the area
ESPFIX_STACKS_PER_PAGE = 64  # arch/x86/kernel/espfix_64.c: 64-byte stacks
ESPFIX_PTE_STRIDE = 16  # one espfix page every 64 KiB: 32 clones per PTE table
ESPFIX_PUD_CLONES = 4  # 65536 / (32 PTE clones * 512 PMD clones)


class Kernel:
    """One booted (or booting) kernel: RAM, allocators, the init PGD pair and a process."""

    def __init__(self, profile: Profile, design: PtiHooks, nr_cpus: int = 4, levels: int = 4,
                 kaslr: bool = True, seed: int = 0):
        if not 1 <= nr_cpus <= NR_CPUS_MAX:
            raise UsageError(f"NR_CPUS must be between 1 and {NR_CPUS_MAX}, not {nr_cpus}")
        self.geometry = Geometry(levels)
        profile.check(nr_cpus, levels)
        self.profile = profile
        self.nr_cpus = nr_cpus
        self.design = design
        self.percpu_vars = _percpu_layout(profile)
        unit = profile.percpu_unit_pages * e.PAGE_SIZE
        # Twice what the kernel needs: the designs' arena is the upper half.
        ram = (2 * ((512 << 20) + nr_cpus * (unit + 0x10000)) + (1 << 30) - 1) & ~((1 << 30) - 1)
        self.ram = SimulatedRAM(ram)
        self.alloc = PhysicalAllocators(ram, PHYS_START + IMAGE_SIZE)
        self.page_offset = PAGE_OFFSET[levels]
        self.area_base = profile.area_base(nr_cpus)
        self.kaslr, self.seed = kaslr, seed
        self.cea_offset = init_cea_offsets(profile, nr_cpus, kaslr, seed)
        # Where the area's pages may lie: all of its P4D once slots are random.
        self.area_end = self.area_base + (CPU_ENTRY_AREA_MAP_SIZE if profile.random_cea_slots
                                          else profile.area_size(nr_cpus))
        self.kernel_pgd = self.symbol_pa("init_top_pgt")
        self.user_pgd = self.kernel_pgd + e.PAGE_SIZE
        self.writes: Counter[tuple[str, Phase]] = Counter()
        self.online: set[int] = set()
        self.percpu_base = 0
        # init_espfix_random() runs even with nokaslr; fixed here for a
        # reproducible model (35 is what one real boot drew).
        self.espfix_page_random = 35
        self.espfix_slot_random = 0
        self.mm_kernel_pgd = self.mm_user_pgd = 0
        self._area_stamp: Callable[[int | np.ndarray], np.ndarray] | None = None
        design.attach(self)

    # -- addresses ---------------------------------------------------------
    def symbol_pa(self, name: str) -> int:
        return PHYS_START + SYMBOLS[name]

    def percpu_pa(self, cpu: int | np.ndarray, backing: str) -> int | np.ndarray:
        """Physical address of a per-CPU variable ('exception_stacks+0x2000' style);
        of each CPU's copy when cpu is a uint64 array."""
        var, _, off = backing.partition("+")
        unit = self.profile.percpu_unit_pages * e.PAGE_SIZE
        return self.percpu_base + cpu * unit + self.percpu_vars[var] + (int(off, 16) if off else 0)

    def backing_pa(self, piece: Piece, cpu: int | None) -> int:
        if not piece.backing:
            return 0
        if piece.backing.split("+")[0] in SYMBOLS:
            return self.symbol_pa(piece.backing)
        assert cpu is not None
        return self.percpu_pa(cpu, piece.backing)

    def direct_map_va(self, pa: int) -> int:
        return self.page_offset + pa

    def cpu_base(self, cpu: int) -> int:
        """get_cpu_entry_area(cpu): where this CPU's area starts."""
        return self.profile.cpu_base(self.nr_cpus, cpu, int(self.cea_offset[cpu]))

    def cpu_bases(self, cpus: np.ndarray) -> np.ndarray:
        """cpu_base() of each of cpus."""
        return self.profile.cpu_base(self.nr_cpus, cpus, self.cea_offset[cpus].astype(np.uint64))

    def piece_va(self, piece: Piece, cpu: int | None) -> int:
        base = self.area_base if cpu is None else self.cpu_base(cpu)
        return base + piece.offset

    def area_pmds(self) -> list[int]:
        """The 2 MiB-aligned addresses of every PMD entry that maps a page of
        the area (its header and each possible CPU's slot), in order."""
        p = self.profile
        stride = np.uint64(p.stride)
        starts = np.uint64(self.area_base + p.first_cpu_offset) + self.cea_offset.astype(np.uint64) * stride
        firsts = np.append(starts, np.uint64(self.area_base)) >> np.uint64(21)
        lasts = (starts + stride - np.uint64(1)) >> np.uint64(21)
        return [int(pmd) << 21 for pmd in np.union1d(firsts, lasts)]

    def cea_ptes(self, piece: Piece, cpu: int | None) -> np.ndarray:
        """The PTEs cea_set_pte() writes for the pages of a piece."""
        flags = RIGHTS[piece.rights]
        if not self.profile.global_cea and flags & e.P:
            flags &= ~e.G
        if not flags & e.P:
            return np.full(piece.pages, flags, dtype=np.uint64)
        first = self.backing_pa(piece, cpu)
        return np.arange(first, first + piece.pages * e.PAGE_SIZE, e.PAGE_SIZE, dtype=np.uint64) | np.uint64(flags)

    def area_ptes(self, cpu: int, ptes_of: Callable[[Piece], np.ndarray | None]) -> np.ndarray:
        """One CPU's whole area as a PTE array (zero in guard holes), so it is
        written a table at a time rather than a piece at a time."""
        out = np.zeros(self.profile.stride // e.PAGE_SIZE, dtype=np.uint64)
        for piece in self.profile.per_cpu:
            ptes = ptes_of(piece)
            if ptes is not None:
                first = piece.offset // e.PAGE_SIZE
                out[first:first + piece.pages] = ptes
        return out

    def area_stamp(self, ptes_of: Callable[[Piece, int], np.ndarray | None]
                   ) -> Callable[[int | np.ndarray], np.ndarray]:
        """cpus -> a row of area_ptes(cpu, lambda piece: ptes_of(piece, cpu)) per
        CPU (one row for a single cpu), the pieces walked once, not once per CPU.

        For ptes_of that maps a piece's pages at its backing's address for that
        CPU (cea_set_pte()'s per_cpu_ptr()): a present page aliasing a per-CPU
        variable moves by one percpu unit per CPU, anything else stays, so every
        CPU's PTEs are CPU 0's plus cpu units where a page is per-CPU."""
        unit = np.uint64(self.profile.percpu_unit_pages * e.PAGE_SIZE)

        def unit_step(piece: Piece) -> np.ndarray | None:
            ptes = ptes_of(piece, 0)
            if ptes is None or not piece.backing or piece.backing.split("+")[0] in SYMBOLS:
                return None
            return np.where(ptes & np.uint64(e.P), unit, np.uint64(0))

        cpu0 = self.area_ptes(0, lambda piece: ptes_of(piece, 0))
        step = self.area_ptes(0, unit_step)
        return lambda cpus: cpu0 + step * np.asarray(cpus, dtype=np.uint64)[..., None]

    def cpu_area_ptes(self, cpus: int | np.ndarray) -> np.ndarray:
        """The whole area of a CPU (or a row per CPU of an array) as setup_cpu_entry_area() writes it."""
        if self._area_stamp is None:
            self._area_stamp = self.area_stamp(self.cea_ptes)
        return self._area_stamp(cpus)

    def kernel_cr3(self) -> CR3:
        return CR3(self.mm_kernel_pgd or self.kernel_pgd)

    def user_cr3(self) -> CR3:
        return CR3(self.mm_user_pgd or self.user_pgd)

    # -- allocation and writes ----------------------------------------------
    def table_allocator(self, owner: str, purpose: str, allocator: Allocator | None = None):
        """A table allocator for the current phase, as the kernel code of that phase would use."""
        def alloc() -> int:
            chosen = allocator or (Allocator.MEMBLOCK if self.alloc.phase is Phase.EARLY else Allocator.BUDDY)
            gfp = Gfp.NONE if chosen is Allocator.MEMBLOCK else (
                Gfp.ATOMIC if self.alloc.phase is Phase.AP_BRINGUP else Gfp.KERNEL)
            pa = self.alloc.alloc(chosen, gfp, owner, purpose)
            self.ram.clear_frame(pa >> e.PAGE_SHIFT)
            return pa
        return alloc

    def write(self, owner: str, pa: int, value: int) -> None:
        self.ram.write_entry(pa, value)
        self.writes[(owner, self.alloc.phase)] += 1

    def write_run(self, owner: str, pa: int, values: np.ndarray) -> None:
        """Consecutive entries of one table, counted one write per non-zero entry."""
        self.ram.write_entries(pa, values)
        self.writes[(owner, self.alloc.phase)] += int(np.count_nonzero(values))

    def install(self, owner: str, pgd: int, vas: np.ndarray, ptes: np.ndarray, alloc: AllocTable) -> None:
        """Write ptes as the PTEs for vas under pgd, in order, making missing
        tables with alloc; counted one write per non-zero entry."""
        install_entries(self.ram, self.geometry, pgd, vas, ptes, self.geometry.levels - 1, alloc)
        self.writes[(owner, self.alloc.phase)] += int(np.count_nonzero(ptes))

    def kernel_entry(self, va: int, depth: int) -> int | None:
        """Physical address of the kernel PGD's entry for va at depth, if its tables exist."""
        return entry_address(self.ram, self.geometry, self.kernel_pgd, va, depth)

    def set_pte_vaddr(self, vas: np.ndarray, ptes: np.ndarray) -> None:
        """arch/x86/mm/init_64.c set_pte_vaddr() for each of vas in turn: missing
        tables come from memblock early and GFP_ATOMIC pages later (spp_getpage())."""
        self.install("kernel", self.kernel_pgd, vas, ptes, self.table_allocator("kernel", CEA_TABLE_PURPOSE))

    # -- boot ------------------------------------------------------------------
    def boot(self) -> "Kernel":
        self.alloc.phase = Phase.EARLY  # start_kernel(): memblock only
        self._map_kernel_image()
        self._map_direct_map()
        self._setup_percpu()
        if self.profile.cea_at_boot:
            # trap_init(): setup_cpu_entry_areas() for all possible CPUs
            self._map_area_header()
            self._setup_cpu_entry_areas(np.arange(self.nr_cpus))
        else:
            # setup_fixmap_gdt(0): CPU 0's area
            self._setup_cpu_entry_areas(np.array([0]))
        self.online.add(0)
        self.alloc.phase = Phase.BOOT  # mm_init(): memblock handed to the buddy allocator
        self._init_espfix(0)
        self.design.on_pti_init()  # pti_init()
        for cpu in progress.over(range(1, self.nr_cpus), "booting APs"):
            self.cpu_up(cpu)
        self.alloc.phase = Phase.RUNTIME  # smp_init() done; init runs
        self._spawn_init_process()
        return self

    def cpu_up(self, cpu: int) -> None:
        if cpu in self.online:
            raise UsageError(f"CPU {cpu} is already online")
        if not 0 < cpu < self.nr_cpus:
            raise UsageError(f"CPU {cpu} is not a possible AP (NR_CPUS={self.nr_cpus})")
        previous = self.alloc.phase
        self.alloc.cpu = cpu
        # do_boot_cpu(): init_espfix_ap() runs on the BSP
        self._init_espfix(cpu)
        self.alloc.phase = Phase.AP_BRINGUP  # cpu_init() on the AP, interrupts off
        if not self.profile.cea_at_boot:
            self._setup_cpu_entry_areas(np.array([cpu]))
        self.design.on_ap_online(cpu)
        self.online.add(cpu)
        self.alloc.phase = previous  # the AP is online
        self.alloc.cpu = None

    def cpu_down(self, cpu: int) -> None:
        if cpu not in self.online or cpu == 0:
            raise UsageError(f"CPU {cpu} is not an online AP")
        self.online.discard(cpu)
        self.alloc.cpu = cpu
        self.design.on_ap_offline(cpu)
        self.alloc.cpu = None

    def _map(self, va: int, pa: int, flags: int, shift: int, purpose: str, pgd: int | None = None,
             table_flags: int = e.KERNPG_TABLE) -> None:
        map_page(self.ram, self.geometry, self.kernel_pgd if pgd is None else pgd, va, pa, flags,
                 self.table_allocator("kernel", purpose), shift, table_flags)

    def _map_kernel_image(self) -> None:
        """head_64.S's level2_kernel_pgt: the image in 2 MiB pages, text RX, rodata RO, data RW."""
        for off in range(0, IMAGE_SIZE, 1 << 21):
            va = TEXT_START + off
            if va < RODATA_START:
                flags = e.PAGE_KERNEL_ROX & ~e.G
            elif va < DATA_START:
                flags = e.PAGE_KERNEL_RO & ~e.G
            else:
                flags = e.PAGE_KERNEL & ~e.G
            self._map(va, PHYS_START + off, flags, 21, "kernel image")

    def _map_direct_map(self) -> None:
        """init_memory_mapping(): all RAM at PAGE_OFFSET, in 1 GiB pages."""
        for pa in range(0, self.ram.size, 1 << 30):
            self._map(self.direct_map_va(pa), pa, e.PAGE_KERNEL & ~e.G, 30, "direct map")

    def _setup_percpu(self) -> None:
        """pcpu_embed_first_chunk(): one unit per possible CPU, from memblock."""
        pages = self.profile.percpu_unit_pages * self.nr_cpus
        self.percpu_base = self.alloc.alloc(Allocator.MEMBLOCK, Gfp.NONE, "kernel", "percpu first chunk",
                                            pages, align=1 << 21)

    def _map_area_header(self) -> None:
        for piece in self.profile.header:
            self.set_pte_vaddr(page_vas([self.piece_va(piece, None)], piece.pages).ravel(), self.cea_ptes(piece, None))
        if self.profile.header:
            self.design.on_area_ready(None, np.array([self.area_base], dtype=np.uint64), self.profile.first_cpu_offset)

    def _setup_cpu_entry_areas(self, cpus: np.ndarray) -> None:
        """setup_cpu_entry_area() for each of cpus in turn, then the design's hook once."""
        starts = self.cpu_bases(cpus)
        vas = page_vas(starts, self.profile.stride // e.PAGE_SIZE)
        self.set_pte_vaddr(vas.ravel(), self.cpu_area_ptes(cpus).ravel())
        self.design.on_area_ready(cpus, starts, self.profile.stride)

    def espfix_base_addr(self, cpu: int) -> int:
        """espfix_64.c espfix_base_addr(): the page index is XORed with
        page_random and lands 64 KiB apart, the upper bits moved up 16."""
        page = (cpu // ESPFIX_STACKS_PER_PAGE) ^ self.espfix_page_random
        slot = (cpu + self.espfix_slot_random) % ESPFIX_STACKS_PER_PAGE
        addr = (page << e.PAGE_SHIFT) + slot * 64
        addr = (addr & 0xFFFF) | ((addr & ~0xFFFF) << 16)
        return ESPFIX_BASE_ADDR + addr

    def _init_espfix(self, cpu: int) -> None:
        """espfix_64.c init_espfix_bsp()/init_espfix_ap(): the P4D entry points
        at espfix_pud_page (in the image); each espfix page is mapped every
        64 KiB of a PTE table that all 512 entries of a PMD table point at,
        and 4 PUD entries point at that PMD table: 65536 aliases of one page."""
        g = self.geometry
        if cpu % ESPFIX_STACKS_PER_PAGE:
            return  # this CPU shares an espfix page already set up
        p4d_depth = g.levels - 4
        pud = self.symbol_pa("espfix_pud_page")
        alloc = self.table_allocator("kernel", "espfix")
        if cpu == 0:
            slot = entry_address(self.ram, g, self.kernel_pgd, ESPFIX_BASE_ADDR, p4d_depth, alloc)
            self.write("kernel", slot, pud | e.KERNPG_TABLE)
        addr = self.espfix_base_addr(cpu)
        table_prot = (e.KERNPG_TABLE & ~e.RW) | e.NX  # PGTABLE_PROT
        pud_slot = pud + 8 * g.index(addr, p4d_depth + 1)
        pud_entry = self.ram.read_entry(pud_slot)
        if not pud_entry & e.P:
            pud_entry = alloc() | table_prot
            self.write_run("kernel", pud_slot, np.full(ESPFIX_PUD_CLONES, pud_entry, dtype=np.uint64))
        pmd = e.frame_address(pud_entry)
        pmd_entry = self.ram.read_entry(pmd)  # pmd_index(addr) is always 0
        if not pmd_entry & e.P:
            pmd_entry = alloc() | table_prot
            self.write_run("kernel", pmd, np.full(512, pmd_entry, dtype=np.uint64))
        pte = e.frame_address(pmd_entry)
        stack = alloc()
        first = g.index(addr, g.levels - 1)
        for i in range(first, 512, ESPFIX_PTE_STRIDE):
            self.write("kernel", pte + 8 * i, stack | e.PAGE_KERNEL_RO)

    def _spawn_init_process(self) -> None:
        """pgd_alloc() + pgd_ctor(): an 8 KiB pair whose kernel halves copy the
        init PGD pair; then the process's own user mappings, whose top-level
        entries carry NX in the kernel copy only (pti_set_user_pgtbl())."""
        pair = self.alloc.alloc(Allocator.BUDDY, Gfp.KERNEL, "kernel", "pgd pair (order 1)", 2, align=0x2000)
        self.ram.clear_frame(pair >> e.PAGE_SHIFT)
        self.ram.clear_frame((pair >> e.PAGE_SHIFT) + 1)
        self.mm_kernel_pgd, self.mm_user_pgd = pair, pair + e.PAGE_SIZE
        for src, dst in ((self.kernel_pgd, self.mm_kernel_pgd), (self.user_pgd, self.mm_user_pgd)):
            frame = self.ram.read_frame(src >> e.PAGE_SHIFT)
            for i in range(256, 512):
                if frame[i]:
                    self.write("kernel", dst + 8 * i, int(frame[i]))
        data = self.alloc.alloc(Allocator.BUDDY, Gfp.KERNEL, "kernel", "user pages", 16)
        for va, pages, flags in USER_MAPPINGS:
            for p in range(pages):
                self._map(va + p * e.PAGE_SIZE, data, flags, 12, "user page tables", pgd=self.mm_user_pgd,
                          table_flags=e.PAGE_TABLE)
                data += e.PAGE_SIZE
        user = self.ram.read_frame(self.mm_user_pgd >> e.PAGE_SHIFT)
        for i in range(256):
            if user[i]:
                self.write("kernel", self.mm_kernel_pgd + 8 * i, int(user[i]) | e.NX)


def init_cea_offsets(profile: Profile, nr_cpus: int, kaslr: bool, seed: int) -> np.ndarray:
    """arch/x86/mm/cpu_entry_area.c init_cea_offsets() (6.2+): without KASLR
    CPU i gets slot i; with it, every possible CPU draws slots below max_cea
    until it finds one no earlier CPU holds. The kernel draws from
    get_random_u32_below(); the model from a generator seeded with seed, so
    one seed is one reproducible boot."""
    if not (profile.random_cea_slots and kaslr):
        return np.arange(nr_cpus, dtype=np.int64)
    draw = random.Random(seed).randrange
    max_cea = profile.max_cea()
    taken: set[int] = set()
    slots = np.empty(nr_cpus, dtype=np.int64)
    for cpu in range(nr_cpus):
        cea = draw(max_cea)
        while cea in taken:
            cea = draw(max_cea)
        taken.add(cea)
        slots[cpu] = cea
    return slots


def _percpu_layout(profile: Profile) -> dict[str, int]:
    """Offsets of the per-CPU variables the area aliases, packed in a unit."""
    sizes: dict[str, int] = {}
    for piece in profile.per_cpu:
        if not piece.backing or piece.backing in SYMBOLS:
            continue
        var, _, off = piece.backing.partition("+")
        end = (int(off, 16) if off else 0) + piece.pages * e.PAGE_SIZE
        sizes[var] = max(sizes.get(var, 0), end)
    offsets, at = {}, 0
    for var, size in sizes.items():
        offsets[var] = at
        at += size
    if at > profile.percpu_unit_pages * e.PAGE_SIZE:
        raise ValueError(f"{profile.name}: per-CPU variables overflow the percpu unit")
    return offsets
