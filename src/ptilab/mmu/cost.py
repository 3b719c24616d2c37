"""What a design costs the TLB: play entry/exit workloads on an MMU over a
booted kernel's real tables and count misses, walk loads and cache lines.

The seed's claim, that sharing the cpu_entry_area's tables "should be a wee
bit faster, too, since we reduce the number of cache lines needed to refill
the TLB", becomes two numbers per workload: the distinct 64-byte lines the
page walks load, and how many of them the kernel view's and the user view's
walks have in common (lines a shared table lets both views use).

Each workload runs twice on one MMU: cold (empty TLB, paging-structure and
data caches: the refill after something flushed everything) and warm (the
same workload again at once: what survives the CR3 writes between them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

from ptilab import progress
from ptilab.errors import UsageError
from ptilab.linux.kernel import Kernel
from ptilab.pti import boot
from ptilab.mmu.mmu import MMU
from ptilab.mmu.tlb import TLB, get_core
from ptilab.mmu.workload import Miss, PTIState, Workload, available, load, play, processes, symbols

PTI_OFF = "off"  # the baseline: no PTI, one CR3 per mm, no switch on entry or exit


@dataclass(frozen=True)
class Refill:
    accesses: int
    l1_hits: int  # translations the first-level DTLB/ITLB held
    stlb_hits: int  # missed the first level, held by the second
    tlb_misses: int  # page walks
    walk_loads: int  # page-table entries the walks read
    lines: int  # distinct 64-byte lines those loads touched
    lines_both_views: int  # lines loaded by walks of the kernel view and of the user view
    dcache_misses: int  # walk loads that missed the (LRU) data cache
    psc_hits: int  # walks shortened by a paging-structure cache
    faults: tuple[str, ...]  # accesses whose walk found no translation: the real kernel would die here


@dataclass(frozen=True)
class WorkloadCost:
    workload: str
    profile: str
    design: str
    cpus: int
    levels: int
    pcid: bool
    cpu: int
    cold: Refill
    warm: Refill
    misses: tuple[Miss, ...]  # the cold run's TLB misses, in order
    core: str = "skylake"  # whose TLB hierarchy (ptilab.mmu.tlb.CORES)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["misses"] = [{**asdict(m), "va": f"{m.va:#x}"} for m in self.misses]
        return d


def _refill(mmu: MMU, workload: Workload, state: PTIState, names: list[dict], profile: str) -> tuple[Refill, list[Miss]]:
    s = mmu.stats
    before = (s.accesses, s.l1_hits, s.stlb_hits, s.tlb_misses, s.walk_loads, s.dcache_misses,
              sum(s.psc_hits.values()))
    mmu.loads.clear()
    misses = play(workload, mmu, state, names, profile)
    views: dict[str, set[int]] = {}
    for walk_load in mmu.loads:
        views.setdefault(walk_load.view, set()).add(walk_load.line)
    both = views.get("kernel", set()) & views.get("user", set())
    after = (s.accesses, s.l1_hits, s.stlb_hits, s.tlb_misses, s.walk_loads, s.dcache_misses,
             sum(s.psc_hits.values()))
    d = [a - b for a, b in zip(after, before)]
    faults = tuple(f"{m.at} ({m.view} view, {m.va:#x})" for m in misses if m.fault)
    return Refill(d[0], d[1], d[2], d[3], d[4], len(set().union(*views.values())) if views else 0, len(both),
                  d[5], d[6], faults), misses


def measure(kernel: Kernel, workload: str | Workload, pcid: bool, cpu: int = 0, pti: bool = True,
            design: str | None = None, core: str = "skylake") -> WorkloadCost:
    """Play one workload cold and then warm on a fresh MMU (core's TLBs) over a booted kernel."""
    if not 0 <= cpu < kernel.nr_cpus:
        raise UsageError(f"CPU {cpu} does not exist with NR_CPUS={kernel.nr_cpus}")
    w = workload if isinstance(workload, Workload) else load(workload)
    procs = processes(kernel, w.processes)
    names = [symbols(kernel, cpu, p) for p in procs]
    mmu = MMU(kernel.ram, kernel.geometry, pcide=pcid, tlb=TLB(get_core(core)))
    state = PTIState(mmu, procs, pti=pti, pcid=pcid)
    state.enter_user()
    cold, misses = _refill(mmu, w, state, names, kernel.profile.name)
    warm, _ = _refill(mmu, w, state, names, kernel.profile.name)
    return WorkloadCost(w.name, kernel.profile.name, design or kernel.design.name, kernel.nr_cpus,
                        kernel.geometry.levels, pcid, cpu, cold, warm, tuple(misses), core)


def cost(profile: str = "linux-6.1", design: str = "linux", cpus: int = 4, levels: int = 4,
         workload: str | Iterable[str] | None = None, pcid: bool = True, cpu: int = 0,
         core: str = "skylake") -> list[WorkloadCost]:
    """Refill cost of each workload (all shipped ones by default; names or
    .toml paths) for one kernel, design and PCID setting. design "off" is the
    PTI-off baseline: the kernel's own tables, no CR3 switch on entry/exit."""
    if workload is None:
        chosen = available()
    elif isinstance(workload, str):
        chosen = [workload]
    else:
        chosen = list(workload)
    pti = design != PTI_OFF
    out = []
    for name in chosen:
        # A fresh kernel per workload: processes() allocates tasks in it.
        kernel = boot(profile, design if pti else "linux", cpus, levels)
        out.append(measure(kernel, name, pcid, cpu, pti, design, core))
    return out


def sweep(profile: str = "linux-6.1", cpus: Iterable[int] = (1, 2, 4, 8, 16, 64, 256),
          designs: Iterable[str] | None = None, levels: int = 4, workload: str | Iterable[str] | None = None,
          pcid: bool = True, cpu: int = 0, core: str = "skylake") -> list[WorkloadCost]:
    """cost() over NR_CPUS and designs (every design and the PTI-off baseline by default)."""
    from ptilab.pti import DESIGNS

    designs = list(designs) if designs is not None else [*DESIGNS, PTI_OFF]
    runs = progress.over([(n, d) for n in cpus for d in designs], "measuring NR_CPUS x designs")
    return [c for n, d in runs for c in cost(profile, d, n, levels, workload, pcid, cpu, core)]


def same_for_every_nr_cpus(costs: list[WorkloadCost]) -> bool:
    """True if each (design, workload) refills alike at every NR_CPUS swept:
    the workloads run on one CPU, whose cpu_entry_area pages and tables do
    not depend on how many other CPUs exist (their areas are never walked)."""
    seen: dict[tuple[str, str], tuple[Refill, Refill]] = {}
    for c in costs:
        refills = (c.cold, c.warm)
        if seen.setdefault((c.design, c.workload), refills) != refills:
            return False
    return len({c.cpus for c in costs}) > 1
