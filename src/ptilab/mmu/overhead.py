"""What PTI costs a system call, in cycles: will-it-scale's lseek1 loop
(workloads/round-trip/lseek.toml) played on the MMU model under every
configuration of four axes, PTI, PCID, what the tables mark global and the
design, and priced by ptilab.mmu.cycles.

A call's cycles are its base, the work of the round trip the model does not
count (the instructions of entry, ksys_lseek and exit, every access hitting
the first-level TLB), plus the modelled events. The base is the one figure
taken from a measurement: Hansen's PTI-off lseek1 rate (BASELINE_CALLS_PER_S)
at the Skylake preset's clock, less what the model counts with PTI off. It
is the same number of cycles on every preset (the instructions do not
change; a narrower core would take more cycles for them, which the model
does not know). Nothing about the PTI configurations is fitted: their
ratios against PTI off are predictions (tests/mmu/test_overhead.py holds
them against Hansen's table, HANSEN).

Between two calls user space touches `working_set` pages of its own heap
(the heap's pages share one frame: the model reads tables, never data).
Without PCID every CR3 write flushes them, so each call re-walks them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ptilab.errors import UsageError
from ptilab.linux.kernel import DATA_START, ENTRY_TEXT, TEXT_START, Kernel
from ptilab.memory.allocators import Allocator, Gfp
from ptilab.mmu import cycles as cy
from ptilab.mmu.mmu import MMU
from ptilab.mmu.tlb import TLB, get_core
from ptilab.mmu.workload import WORKLOAD_DIR, PTIState, load, play, processes, symbols
from ptilab.paging import entry as e
from ptilab.paging.cr3 import CR3
from ptilab.paging.install import map_page
from ptilab.paging.translate import PageFault, translate

LSEEK = WORKLOAD_DIR / "round-trip" / "lseek.toml"
GLOBALS = ("none", "entry", "text")
WARM_CALLS = 3  # calls played before measuring: the steady state of a loop
MEASURED_CALLS = 4
HEAP = 0x1000_0000  # the user heap the working set lives in (PGD slot 0, beside text and data)
MAX_WORKING_SET = 4096

# Dave Hansen, LKML 2017-11-01, the KAISER series: will-it-scale lseek1, one
# thread, lseeks per second (as quoted in issue 22).
BASELINE_CALLS_PER_S = 5.2e6
HANSEN = (
    # (pti, pcid, global, lseeks/s)
    (False, True, None, 5.2e6),
    (True, True, "none", 3.0e6),
    (True, True, "entry", 3.1e6),
    (True, False, "none", 2.2e6),
    (True, False, "entry", 2.5e6),
)
HANSEN_LABELS = ("no KAISER", "KAISER, PCID", "KAISER, PCID, entry global", "KAISER, no PCID",
                 "KAISER, no PCID, entry global")
SLAB_OBJECTS = ("files_struct", "file", "inode", "super_block")


class CountingMMU(MMU):
    """An MMU that also counts which CR3 writes flushed (SDM 4.10.4.1)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cr3_flushes = 0

    def mov_cr3(self, value: CR3 | int, view: str | None = None) -> None:
        cr3 = CR3(value.value if isinstance(value, CR3) else value, self.pcide)
        self.cr3_flushes += not cr3.noflush
        super().mov_cr3(value, view)


@dataclass(frozen=True)
class Config:
    pti: bool
    pcid: bool
    global_: str | None  # None with PTI off: no user tables to mark
    design: str | None  # None with PTI off


@dataclass(frozen=True)
class CallCost:
    """One configuration's steady-state call: events per call and their price."""

    config: Config
    core: str
    working_set: int
    events: dict[str, float]  # per call, by ptilab.mmu.cycles term
    terms: dict[str, float]  # cycles per call, by term
    base_cycles: float
    cycles_per_call: float
    calls_per_second: float
    throughput_ratio: float  # calls/s over calls/s with PTI off (same PCID, core, working set)
    tlb_misses: float  # walks per call

    def as_row(self) -> dict:
        c = self.config
        return {"pti": c.pti, "pcid": c.pcid, "global": c.global_, "design": c.design,
                "cycles_per_call": round(self.cycles_per_call, 1),
                "calls_per_second": round(self.calls_per_second),
                "throughput_ratio": round(self.throughput_ratio, 4),
                "core": self.core, "working_set": self.working_set,
                "tlb_misses_per_call": self.tlb_misses,
                "cycles_by_term": {k: round(v, 1) for k, v in self.terms.items()}}


# -- what the tables mark global -------------------------------------------------
def _set_global(kernel: Kernel, pgd: int, start: int, end: int, on: bool) -> None:
    """Set or clear G in every leaf mapping [start, end) under pgd."""
    g, ram = kernel.geometry, kernel.ram
    va = start
    while va < end:
        try:
            t = translate(ram, pgd, va, g)
        except PageFault as fault:
            va = (va | ((1 << g.shift(len(fault.reads) - 1)) - 1)) + 1  # past the hole
            continue
        slot, value = t.reads[-1].pa, t.leaf
        want = value | e.G if on else value & ~e.G
        if want != value:
            kernel.write("kernel", slot, want)
        va = (va & ~(t.page_size - 1)) + t.page_size


def mark_global(kernel: Kernel, mode: str) -> None:
    """none: nothing global (KAISER as posted); entry: the entry text and the
    cpu_entry_area (pti_clone_entry_text(), cea_set_pte() since 4.17, what
    Linux does); text: those and the kernel image's text and rodata, cloned
    into the user tables (pti_clone_kernel_text() when
    pti_kernel_image_global_ok(), i.e. without PCID)."""
    if mode not in GLOBALS:
        raise UsageError(f"unknown --global {mode!r}; choose one of: {', '.join(GLOBALS)}")
    if mode == "text":
        kernel.design.clone_pmds(TEXT_START, DATA_START, "user pmd for the kernel image (pti_clone_kernel_text)")
    entry = [ENTRY_TEXT, (kernel.area_base, kernel.area_end)]
    for pgd in dict.fromkeys((kernel.kernel_pgd, kernel.user_pgd, kernel.mm_kernel_pgd, kernel.mm_user_pgd)):
        for start, end in entry:
            _set_global(kernel, pgd, start, end, mode != "none")
        _set_global(kernel, pgd, TEXT_START, DATA_START, mode == "text")
        if mode != "text":  # the entry text's PMD lies inside the image: put it back
            _set_global(kernel, pgd, *ENTRY_TEXT, mode == "entry")


# -- one configuration -----------------------------------------------------------
def _slab_objects(kernel: Kernel) -> dict[str, tuple[int, int]]:
    """The objects lseek reads, one page each from the buddy allocator, through the direct map."""
    out = {}
    for name in SLAB_OBJECTS:
        pa = kernel.alloc.alloc(Allocator.BUDDY, Gfp.KERNEL, "kernel", name, 1)
        out[name] = (kernel.direct_map_va(pa), e.PAGE_SIZE)
    return out


def _map_heap(kernel: Kernel, pages: int) -> None:
    if not pages:
        return
    frame = kernel.alloc.alloc(Allocator.BUDDY, Gfp.KERNEL, "kernel", "user heap frame", 1)
    alloc = kernel.table_allocator("kernel", "user page tables")
    flags = e.P | e.US | e.RW | e.A | e.D | e.NX
    for p in range(pages):
        map_page(kernel.ram, kernel.geometry, kernel.mm_user_pgd, HEAP + p * e.PAGE_SIZE, frame, flags, alloc,
                 table_flags=e.PAGE_TABLE)


def _events(mmu: CountingMMU) -> dict[str, float]:
    s = mmu.stats
    return {cy.CR3_FLUSH: mmu.cr3_flushes, cy.CR3_NOFLUSH: s.cr3_writes - mmu.cr3_flushes, cy.STLB_HIT: s.stlb_hits,
            cy.STLB_MISS: s.tlb_misses, cy.WALK_LOAD_L1: s.dcache_hits, cy.WALK_LOAD_L2: s.dcache_misses, cy.INVPCID: 0, cy.INVLPG: 0,
            "walks": s.tlb_misses}


def call_events(config: Config, profile: str = "kaiser-2017", core: str = "skylake", working_set: int = 0,
                cpus: int = 4, workload: str | Path = LSEEK) -> dict[str, float]:
    """Events per call of the round trip in its steady state (after WARM_CALLS), plus 'walks'."""
    from ptilab.pti import boot

    if not 0 <= working_set <= MAX_WORKING_SET:
        raise UsageError(f"the working set must be 0 to {MAX_WORKING_SET} pages, not {working_set}")
    kernel = boot(profile, config.design if config.pti else "linux", cpus)
    if config.pti:
        mark_global(kernel, config.global_ or "none")
    w = load(workload)
    procs = processes(kernel, w.processes)
    names = [symbols(kernel, 0, p) | _slab_objects(kernel) for p in procs]
    _map_heap(kernel, working_set)
    mmu = CountingMMU(kernel.ram, kernel.geometry, pcide=config.pcid, tlb=TLB(get_core(core)), record_loads=False)
    state = PTIState(mmu, procs, pti=config.pti, pcid=config.pcid)
    state.enter_user()
    before: dict[str, float] = {}
    for call in range(WARM_CALLS + MEASURED_CALLS):
        if call == WARM_CALLS:
            before = _events(mmu)
        play(w, mmu, state, names, kernel.profile.name)
        for p in range(working_set):  # user code between two calls
            mmu.access(HEAP + p * e.PAGE_SIZE)
    after = _events(mmu)
    return {k: (after[k] - before[k]) / MEASURED_CALLS for k in after}


def base_cycles(profile: str = "kaiser-2017", working_set: int = 0) -> float:
    """The cycles of a PTI-off call the model does not count: Hansen's PTI-off
    rate at Skylake's clock, less the modelled PTI-off events (PCID on, as on his machine)."""
    events = call_events(Config(False, True, None, None), profile, "skylake", working_set)
    events.pop("walks")
    return cy.SKYLAKE.clock_hz / BASELINE_CALLS_PER_S - cy.total(events, cy.SKYLAKE)


def configurations(designs: list[str] | None = None, globals_: tuple[str, ...] = GLOBALS,
                   pcids: tuple[bool, ...] = (True, False), pti: tuple[bool, ...] = (False, True)) -> list[Config]:
    from ptilab.pti import DESIGNS

    designs = list(DESIGNS) if designs is None else designs
    out = []
    for on in pti:
        for pcid in pcids:
            if not on:
                out.append(Config(False, pcid, None, None))
                continue
            out.extend(Config(True, pcid, g, d) for g in globals_ for d in designs)
    return out


def overhead(configs: list[Config] | None = None, profile: str = "kaiser-2017", preset: cy.Preset | str = "skylake",
             working_set: int = 0, base: float | None = None) -> list[CallCost]:
    """Every configuration's steady-state call, priced on preset; PTI-off
    rows (one per PCID setting) are the baselines of the throughput ratios."""
    preset = cy.get_preset(preset) if isinstance(preset, str) else preset
    configs = configurations() if configs is None else configs
    base = base_cycles(profile) if base is None else base
    wanted = {c.pcid for c in configs}
    offs = {pcid: Config(False, pcid, None, None) for pcid in wanted}
    priced: dict[Config, CallCost] = {}
    for config in [*offs.values(), *(c for c in configs if c.pti)]:
        events = call_events(config, profile, preset.tlb, working_set)
        walks = events.pop("walks")
        terms = cy.cycles(events, preset)
        per_call = base + sum(terms.values())
        rate = preset.clock_hz / per_call
        off = priced.get(offs[config.pcid])
        ratio = 1.0 if off is None else rate / off.calls_per_second
        priced[config] = CallCost(config, preset.name, working_set, events, terms, base, per_call, rate, ratio,
                                  walks)
    return [priced[c] for c in configs]


def hansen_rows(costs: list[CallCost], design: str = "explicit") -> list[tuple[str, float, float]]:
    """(Hansen's label, his ratio against no KAISER, the model's) for his five
    configurations; design: whose rows (KAISER mapped its pieces explicitly)."""
    by = {(c.config.pti, c.config.pcid, c.config.global_): c for c in costs if c.config.design in (None, design)}
    if len(by) < len(HANSEN) or any(k[:3] not in by for k in HANSEN):
        raise UsageError("the comparison with Hansen needs PTI off and the none and entry rows, PCID on and off")
    off = by[(False, True, None)].calls_per_second
    return [(label, rate / BASELINE_CALLS_PER_S, by[(pti, pcid, g)].calls_per_second / off)
            for label, (pti, pcid, g, rate) in zip(HANSEN_LABELS, HANSEN)]


def working_set_sweep(sizes: list[int], configs: list[Config], profile: str = "kaiser-2017",
                      preset: cy.Preset | str = "skylake") -> list[CallCost]:
    """overhead() at each working-set size: where flushing without PCID starts to dominate."""
    base = base_cycles(profile)
    return [c for n in sizes for c in overhead(configs, profile, preset, n, base)]


def design_differences(preset: cy.Preset | str = "skylake", profile: str = "linux-4.15",
                       pcid: bool = True) -> list[tuple[str, float, float]]:
    """The seed's question in cycles: per design, (design, cycles per call in
    the lseek loop, cycles of one cold refill of the syscall workload: its
    walk loads that miss the data cache come from L2, the optimistic case)."""
    from ptilab.mmu.cost import cost
    from ptilab.pti import DESIGNS

    preset = cy.get_preset(preset) if isinstance(preset, str) else preset
    configs = [Config(True, pcid, "entry", d) for d in DESIGNS]
    calls = overhead(configs, profile, preset)
    out = []
    for call in calls:
        (c,) = cost(profile, call.config.design, 4, 4, "syscall", pcid, 0, preset.tlb)
        cold = {cy.STLB_HIT: c.cold.stlb_hits, cy.STLB_MISS: c.cold.tlb_misses, cy.WALK_LOAD_L1: c.cold.walk_loads - c.cold.dcache_misses,
                cy.WALK_LOAD_L2: c.cold.dcache_misses}
        out.append((call.config.design, call.cycles_per_call, cy.total(cold, preset)))
    return out
