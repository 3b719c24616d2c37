"""Meltdown exposure: what a user-mode attacker reads through the user tables.

Meltdown (CVE-2017-5754) lets user code read any byte whose translation is
present in the active tables, whatever the US bit says: the permission check
comes too late to stop the speculative load. Under PTI the active tables in
user mode are the user PGD, so its supervisor mappings are exactly what
leaks. This module lists them and reads, through them, the structures the
user tables must keep mapped, for the kernel pointers they hold:

- the IDT (cpu_entry_area's RO page): each gate holds a handler address in
  the entry text, so one gate and the kernel's System.map give the KASLR
  slide and the kernel text base;
- the TSS: sp0 and the IST pointers are cpu_entry_area stack addresses (the
  per-CPU area's placement, which CONFIG_RANDOMIZE_MEMORY hides from 6.2 on);
- the GDT: the TSS descriptor's base is the cpu_entry_area's TSS address.

The model's RAM holds only page tables, so fill_entry_area_contents() first
writes realistic IDT gates, TSS fields and GDT descriptors where those
structures live (the model's idt_table, and each CPU's cpu_tss_rw and
gdt_page), as idt_setup_traps(), cpu_init() and set_tss_desc() would.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ptilab.errors import FrameOutsideMemory
from ptilab.linux.kernel import ENTRY_TEXT, TEXT_START
from ptilab.linux.profiles import CPU_ENTRY_AREA_BASE, LINUX_6_1, Profile
from ptilab.linux.regions import label_ranges
from ptilab.paging import EFF_NX, EFF_RW, EFF_US, PageFault, Walk, coalesce, translate
from ptilab.paging import entry as e

if TYPE_CHECKING:
    from ptilab.linux.kernel import Kernel
    from ptilab.memory.physical import PhysicalMemory

CPU_ENTRY_AREA_RO_IDT = CPU_ENTRY_AREA_BASE  # the IDT is the area's first page, at a fixed address
KERNEL_CS = 0x10  # GDT_ENTRY_KERNEL_CS * 8
GATE_INTERRUPT, GATE_TRAP = 0xE, 0xF
GDT_ENTRY_TSS = 8
GDT_ENTRY_CPUNODE = 15
FIRST_EXTERNAL_VECTOR = 0x20
IRQ_STUB_SIZE = 8  # irq_entries_start: one 8-byte stub per external vector

# Where the model puts the IDT entry stubs of 6.1 (all in .entry.text, the
# part of the kernel text the user tables map), as offsets from _text.
_ENTRY = ENTRY_TEXT[0] - TEXT_START
MODEL_SYMBOLS: dict[str, int] = {name: TEXT_START + _ENTRY + off for name, off in {
    "asm_exc_divide_error": 0x1000, "asm_exc_debug": 0x1040, "asm_exc_nmi": 0x2000, "asm_exc_int3": 0x1080,
    "asm_exc_overflow": 0x10c0, "asm_exc_bounds": 0x1100, "asm_exc_invalid_op": 0x1140,
    "asm_exc_device_not_available": 0x1180, "asm_exc_double_fault": 0x11c0, "asm_exc_invalid_tss": 0x1200,
    "asm_exc_segment_not_present": 0x1240, "asm_exc_stack_segment": 0x1280,
    "asm_exc_general_protection": 0x12c0, "asm_exc_page_fault": 0x1300, "asm_exc_coprocessor_error": 0x1340,
    "asm_exc_alignment_check": 0x1380, "asm_exc_machine_check": 0x13c0,
    "asm_exc_simd_coprocessor_error": 0x1440, "asm_sysvec_apic_timer_interrupt": 0x1400,
    "irq_entries_start": 0x2400,
}.items()} | {"_text": TEXT_START}

# (vector, handler, IST index + 1 or 0, DPL): arch/x86/kernel/idt.c def_idts[] and apic_idts[].
GATES = (
    (0, "asm_exc_divide_error", 0, 0), (1, "asm_exc_debug", 3, 0), (2, "asm_exc_nmi", 2, 0),
    (3, "asm_exc_int3", 0, 3), (4, "asm_exc_overflow", 0, 3), (5, "asm_exc_bounds", 0, 0),
    (6, "asm_exc_invalid_op", 0, 0), (7, "asm_exc_device_not_available", 0, 0),
    (8, "asm_exc_double_fault", 1, 0), (10, "asm_exc_invalid_tss", 0, 0),
    (11, "asm_exc_segment_not_present", 0, 0), (12, "asm_exc_stack_segment", 0, 0),
    (13, "asm_exc_general_protection", 0, 0), (14, "asm_exc_page_fault", 0, 0),
    (16, "asm_exc_coprocessor_error", 0, 0), (17, "asm_exc_alignment_check", 0, 0),
    (18, "asm_exc_machine_check", 4, 0), (19, "asm_exc_simd_coprocessor_error", 0, 0),
    (0xEC, "asm_sysvec_apic_timer_interrupt", 0, 0),
)
IST_STACKS = ("estacks.DF_stack", "estacks.NMI_stack", "estacks.DB_stack", "estacks.MCE_stack")


def gate(handler: int, ist: int = 0, dpl: int = 0, kind: int = GATE_INTERRUPT) -> tuple[int, int]:
    """A 64-bit IDT gate descriptor (SDM vol. 3 6.14.1) as two little-endian u64."""
    lo = (handler & 0xFFFF) | KERNEL_CS << 16 | ist << 32 | (0x80 | dpl << 5 | kind) << 40 \
        | ((handler >> 16) & 0xFFFF) << 48
    return lo, handler >> 32


def gate_handler(lo: int, hi: int) -> int | None:
    """The handler address of a present gate, None for an empty one."""
    if not (lo >> 47) & 1:
        return None
    return (lo & 0xFFFF) | ((lo >> 48) & 0xFFFF) << 16 | (hi & 0xFFFF_FFFF) << 32


def tss_descriptor(base: int, limit: int = 0x206F) -> tuple[int, int]:
    """A 16-byte 64-bit TSS descriptor, busy (type 0xB) as after LTR."""
    lo = (limit & 0xFFFF) | (base & 0xFFFFFF) << 16 | 0x8B << 40 | ((limit >> 16) & 0xF) << 48 \
        | ((base >> 24) & 0xFF) << 56
    return lo, base >> 32


def descriptor_base(lo: int, hi: int) -> int:
    return ((lo >> 16) & 0xFFFFFF) | ((lo >> 56) & 0xFF) << 24 | (hi & 0xFFFF_FFFF) << 32


# -- the model's contents ------------------------------------------------------------
def fill_entry_area_contents(kernel: "Kernel", slide: int = 0) -> None:
    """Write what a booted kernel keeps in the pages the cpu_entry_area
    aliases: the IDT (idt_setup_traps() etc.: gates to the entry stubs, moved
    by a KASLR slide), each CPU's TSS (cpu_init(): sp0 = top of the entry
    stack, ist[] = tops of the IST stacks) and GDT (set_tss_desc(): the TSS
    descriptor's base is the area's TSS). A hook in Kernel.boot() would be
    the natural home; until then the model's RAM holds only tables."""
    from ptilab.mmu.workload import symbols  # the per-CPU piece addresses

    idt = np.zeros(512, dtype=np.uint64)
    for vector in range(FIRST_EXTERNAL_VECTOR, 256):
        lo, hi = gate(MODEL_SYMBOLS["irq_entries_start"] + slide + IRQ_STUB_SIZE * (vector - FIRST_EXTERNAL_VECTOR))
        idt[2 * vector], idt[2 * vector + 1] = lo, hi
    for vector, name, ist, dpl in GATES:
        lo, hi = gate(MODEL_SYMBOLS[name] + slide, ist, dpl)
        idt[2 * vector], idt[2 * vector + 1] = lo, hi
    kernel.ram.write_entries(kernel.symbol_pa("idt_table"), idt)
    for cpu in range(kernel.nr_cpus):
        names = symbols(kernel, cpu)
        sp0 = names["entry_stack_page"][0] + names["entry_stack_page"][1]
        ists = [names[s][0] + names[s][1] if s in names else 0 for s in IST_STACKS] + [0, 0, 0]
        # struct x86_hw_tss, packed: reserved1, sp0, sp1 (unused since 5.11),
        # sp2 (the SYSCALL scratch: the user's last RSP), reserved2, ist[7],
        # reserved3, reserved4, reserved5, io_bitmap_base (no bitmap).
        tss = struct.pack("<IQQQQ7QIIHH", 0, sp0, 0, names["stack"][0] + names["stack"][1] - 8, 0, *ists,
                          0, 0, 0, 0x68)
        tss += bytes(-len(tss) % 8)
        kernel.ram.write_entries(kernel.percpu_pa(cpu, "cpu_tss_rw"), np.frombuffer(tss, dtype="<u8").copy())
        gdt = np.zeros(16, dtype=np.uint64)
        gdt[2], gdt[3] = 0x00AF9B000000FFFF, 0x00CF93000000FFFF  # __KERNEL_CS, __KERNEL_DS
        gdt[4], gdt[5], gdt[6] = 0x00CFFB000000FFFF, 0x00CFF3000000FFFF, 0x00AFFB000000FFFF  # user 32/DS/64
        gdt[GDT_ENTRY_TSS], gdt[GDT_ENTRY_TSS + 1] = tss_descriptor(names["tss"][0])
        gdt[GDT_ENTRY_CPUNODE] = 0x0040F5000000_0000 | cpu  # the vDSO's getcpu() reads the limit
        kernel.ram.write_entries(kernel.percpu_pa(cpu, "gdt_page"), gdt)


# -- the attacker ------------------------------------------------------------------------
@dataclass(frozen=True)
class Readable:
    """Supervisor pages the user tables translate: Meltdown reads them. One
    address-contiguous run, or (aliases > 1) a region's many scattered runs
    of the same frames summed up, as the espfix area's 65536 aliases."""

    start: int
    end: int
    region: str
    pages: int
    frames: int  # distinct physical pages behind them
    writable: bool
    executable: bool

    @property
    def aliases(self) -> int:
        return self.pages // max(self.frames, 1)


@dataclass(frozen=True)
class Leak:
    """A kernel pointer the attacker read, where, and what it gives away."""

    source: str
    va: int
    value: int
    meaning: str


@dataclass
class Exposure:
    readable: list[Readable]
    leaks: list[Leak] = field(default_factory=list)
    idt_page: int | None = None  # where the attacker found the IDT
    text_base: int | None = None  # _text, as recovered
    kaslr_slide: int | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        hexed = lambda v: None if v is None else f"{v:#x}"  # noqa: E731
        return {"readable": [{**r.__dict__, "start": f"{r.start:#x}", "end": f"{r.end:#x}"} for r in self.readable],
                "leaks": [{**lk.__dict__, "va": f"{lk.va:#x}", "value": f"{lk.value:#x}"} for lk in self.leaks],
                "idt_page": hexed(self.idt_page), "text_base": hexed(self.text_base),
                "kaslr_slide": hexed(self.kaslr_slide), "notes": self.notes}


def meltdown_read(mem: "PhysicalMemory", view: Walk, va: int, length: int,
                  notes: list[str] | None = None) -> bytes | None:
    """The primitive: bytes at va if the user tables translate every page of
    them, US or not (the speculative load does not wait for the check).
    None if a page is not mapped, or maps a frame the image does not hold
    (a dump that left it out): that page is unreadable here, and notes says so."""
    out = b""
    while length > 0:
        try:
            t = translate(mem, view.cr3, va, view.geometry)
            chunk = min(length, e.PAGE_SIZE - (va & (e.PAGE_SIZE - 1)))
            out += mem.read(t.pa, chunk)
        except PageFault:
            return None
        except FrameOutsideMemory as missing:
            if notes is not None:
                notes.append(f"{va & ~(e.PAGE_SIZE - 1):#x} maps physical address {missing.pa:#x}, which the "
                             f"image does not hold: that page is unreadable here")
            return None
        va, length = va + chunk, length - chunk
    return out


SUMMARY_AFTER = 64  # runs of one region and rights beyond which they are summed up


def readable(view: Walk) -> list[Readable]:
    """Every supervisor mapping of the user view, by region and rights, in address order."""
    # The runs ignoring frames are what this coalesces to anyway, and they
    # keep the ESPfix area's 65536 aliases per page from being expanded.
    r = view.runs()
    r = coalesce(r[((r["prot"] & np.uint64(e.P)) != 0) & ((r["eff"] & EFF_US) == 0)], by_pa=False)
    # Named as the audit names them (the per-CPU cpu_tss_rw pages are not "direct map").
    r, _, names = label_ranges(r, None, view.geometry)
    groups: dict[tuple[str, int], list[int]] = {}
    for i, name in enumerate(names.tolist()):
        groups.setdefault((name, int(r["eff"][i]) & (EFF_RW | EFF_NX)), []).append(i)
    out = []
    for (region, eff), rows in groups.items():
        runs = r[rows]
        # Runs that follow one another are one row (a TSS's pages, cut apart to be named).
        cuts = np.flatnonzero(runs["va"][1:] != runs["va"][:-1] + runs["size"][:-1]) + 1
        summed = len(cuts) >= SUMMARY_AFTER
        for span in [runs] if summed else np.split(runs, cuts):
            pages = int(span["size"].sum()) // e.PAGE_SIZE
            distinct = {(int(pa), int(size)) for pa, size in zip(span["pa"], span["size"])}
            if len(span) == 1:
                frames = pages
            elif summed:  # aliases of one size (ESPfix): frames are the distinct ones
                frames = len(distinct) * (int(span["size"][0]) // e.PAGE_SIZE)
            else:
                frames = sum(size for _, size in distinct) // e.PAGE_SIZE
            # In Python ints: a range may end at 2**64, past what a uint64 holds.
            out.append(Readable(int(span["va"][0]), int(span["va"][-1]) + int(span["size"][-1]), region, pages, frames,
                                bool(eff & EFF_RW), not eff & EFF_NX))
    return sorted(out, key=lambda x: x.start)


def exposure(mem: "PhysicalMemory", view: Walk, symbols: dict[str, int] | None = None,
             profile: Profile = LINUX_6_1, nr_cpus: int = 64, why_no_idt: str = "") -> Exposure:
    """What a Meltdown attacker in user mode gets from these user tables.

    symbols: the kernel's System.map (unslid, as the distribution ships it);
    with it one IDT gate gives the KASLR slide. profile: where to look for
    each CPU's GDT and TSS, for NR_CPUS nr_cpus (CPUs are tried until one's
    GDT is not mapped). why_no_idt: the reason a modelled design has no IDT
    in its user view, added to that note (a real image's has no known reason)."""
    out = Exposure(readable(view))
    _read_idt(mem, view, symbols, out, why_no_idt)
    for cpu in range(nr_cpus):
        base = profile.cpu_base(nr_cpus, cpu)
        pieces = {p.name: base + p.offset for p in profile.per_cpu}
        gdt = meltdown_read(mem, view, pieces["gdt"], 16 * 8, out.notes)
        if gdt is None:
            break
        _read_gdt(cpu, pieces["gdt"], gdt, out)
        tss = meltdown_read(mem, view, pieces["tss"], 0x68, out.notes)
        if tss is not None:
            _read_tss(cpu, pieces["tss"], tss, out)
    return out


def kernel_exposure(kernel: "Kernel", fill: bool = True, slide: int = 0) -> Exposure:
    """exposure() of a modelled kernel's user view, after writing the IDT, TSS
    and GDT contents the model's RAM otherwise lacks."""
    from ptilab.paging import walk

    if fill:
        fill_entry_area_contents(kernel, slide)
    view = walk(kernel.ram, kernel.user_cr3(), kernel.geometry)
    return exposure(kernel.ram, view, MODEL_SYMBOLS, kernel.profile, kernel.nr_cpus,
                    " (the 2017 layout had no IDT there; the explicit design leaves it out)")


def _read_idt(mem, view: Walk, symbols: dict[str, int] | None, out: Exposure, why_no_idt: str) -> None:
    noted = len(out.notes)
    raw = meltdown_read(mem, view, CPU_ENTRY_AREA_RO_IDT, e.PAGE_SIZE, out.notes)
    if raw is None and len(out.notes) > noted:
        return  # mapped, but past the image: said
    if raw is None:
        out.notes.append(f"the IDT page ({CPU_ENTRY_AREA_RO_IDT:#x}) is not in the user tables: no handler "
                         f"address from it{why_no_idt}")
        return
    out.idt_page = CPU_ENTRY_AREA_RO_IDT
    words = struct.unpack("<512Q", raw)
    handlers = {v: gate_handler(words[2 * v], words[2 * v + 1]) for v in range(256)}
    present = {v: h for v, h in handlers.items() if h is not None}
    if not present:
        out.notes.append("the IDT page is mapped but empty in this image")
        return
    names = {v: name for v, name, _, _ in GATES}
    for v in sorted(present)[:3]:
        out.leaks.append(Leak(f"idt[{v}] {names.get(v, 'irq stub')}", CPU_ENTRY_AREA_RO_IDT + 16 * v, present[v],
                              "kernel entry-text address: with System.map, the KASLR slide"))
    divide = present.get(0)
    if divide is not None and symbols and "asm_exc_divide_error" in symbols:
        out.kaslr_slide = divide - symbols["asm_exc_divide_error"]
        out.text_base = symbols.get("_text", TEXT_START) + out.kaslr_slide
    elif divide is not None:
        # Without symbols: the slide moves the image in 2 MiB steps, so _text
        # is at most the lowest handler, rounded down to 2 MiB.
        out.notes.append(f"no System.map: _text <= {min(present.values()) & ~((1 << 21) - 1):#x}")


def _read_tss(cpu: int, va: int, raw: bytes, out: Exposure) -> None:
    sp0, sp1, sp2 = struct.unpack_from("<QQQ", raw, 4)
    ist = struct.unpack_from("<7Q", raw, 36)
    if not sp0 and not any(ist):
        out.notes.append(f"CPU {cpu}: the TSS is mapped but empty in this image")
        return
    out.leaks.append(Leak(f"cpu {cpu} tss.sp0", va + 4, sp0, "top of this CPU's entry stack: the cpu_entry_area's "
                          "per-CPU placement (randomised from 6.2)"))
    for i, top in enumerate(ist):
        if top:
            out.leaks.append(Leak(f"cpu {cpu} tss.ist[{i}]", va + 36 + 8 * i, top,
                                  f"top of the {IST_STACKS[i].split('.')[1] if i < 4 else 'IST'} stack"))
    if sp1:
        out.leaks.append(Leak(f"cpu {cpu} tss.sp1", va + 12, sp1, "a task stack top (pre-5.11 kernels)"))


def _read_gdt(cpu: int, va: int, raw: bytes, out: Exposure) -> None:
    words = struct.unpack("<16Q", raw)
    lo, hi = words[GDT_ENTRY_TSS], words[GDT_ENTRY_TSS + 1]
    if not lo:
        out.notes.append(f"CPU {cpu}: the GDT page is readable but empty here; a real one's TSS descriptor "
                         "(entry 8) holds the base of the cpu_entry_area's TSS, and entry 15's limit the CPU number")
        return
    out.leaks.append(Leak(f"cpu {cpu} gdt[{GDT_ENTRY_TSS}] TSS descriptor base", va + 8 * GDT_ENTRY_TSS,
                          descriptor_base(lo, hi), "the cpu_entry_area TSS address"))
