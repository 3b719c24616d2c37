"""What each design costs and what it exposes: the table of the seed's debate."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ptilab import progress
from ptilab.compare.views import Divergence, diff, rights
from ptilab.linux.kernel import CEA_TABLE_PURPOSE, Kernel
from ptilab.pti import boot
from ptilab.linux.regions import REGIONS, region_of
from ptilab.memory.allocators import Phase
from ptilab.paging import Walk, walk
from ptilab.paging import entry as e


@dataclass
class DesignReport:
    design: str
    profile: str
    cpus: int
    levels: int
    user_table_pages: int  # page-table pages the design allocated (user side and preallocations)
    pte_writes: int  # entries the design wrote
    ap_allocations: int  # design allocations while bringing APs up
    ap_writes: int  # design writes while bringing APs up
    allocations_by_phase: dict[str, int]
    violations: list[str]
    tables_shared_with_kernel: int  # kernel-half table pages of the user view that the kernel view uses too
    tables_user_only: int  # kernel-half table pages only the user view uses (its top PGD page included)
    user_kernel_pages: int  # present kernel-half pages in the user view (aliases counted)
    user_regions: dict[str, int]  # kernel-half pages visible to user space, by region
    user_rights: dict[str, list[str]]  # the effective rights those pages carry, by region
    cea_divergences: list[Divergence] = field(default_factory=list)
    kernel_cea_tables: int = 0  # the kernel's own tables mapping the cpu_entry_area (PUD/PMD/PTE)
    cea_seed: int | None = None  # the seed of init_cea_offsets()'s random slots; None: slot = CPU

    @property
    def ap_work(self) -> bool:
        return bool(self.ap_allocations or self.ap_writes)

    @property
    def user_table_bytes(self) -> int:
        return self.user_table_pages * e.PAGE_SIZE

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "cea_divergences"}
        d["ap_work"] = self.ap_work
        d["user_table_bytes"] = self.user_table_bytes
        d["cea_divergences"] = [dv.__dict__ for dv in self.cea_divergences]
        return d


def region_pages(view: Walk, levels: int) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Present kernel-half pages of a view per region, and the rights seen in each.

    Counted over the walk's distinct records times how often each occurs in
    each region, so the ESPfix area's aliases are counted, not expanded."""
    edges = sorted({view.geometry.kernel_half_start()} | {edge for start, end, _ in REGIONS[levels]
                                                          for edge in (start, end)})
    r = view.distinct
    present = (r["prot"] & np.uint64(e.P)) != 0
    occurs = view.multiplicity(edges)[present]
    r = r[present]
    counts: Counter[str] = Counter()
    seen: dict[str, set[str]] = {}
    for column in range(1, len(edges) + 1):
        if edges[column - 1] < view.geometry.kernel_half_start():
            continue
        region = region_of(edges[column - 1], levels)
        here = occurs[:, column] > 0
        if not here.any():
            continue
        pages = int((r["size"][here].astype(np.int64) // e.PAGE_SIZE * occurs[here, column]).sum())
        counts[region] += pages
        for eff in np.unique(r["eff"][here]).tolist():
            seen.setdefault(region, set()).add(rights(eff))
    return dict(counts), {k: sorted(v) for k, v in seen.items()}


def measure(kernel: Kernel) -> DesignReport:
    """Walk both views of a booted kernel and account for its design's work."""
    name = kernel.design.name
    user = walk(kernel.ram, kernel.user_cr3(), kernel.geometry)
    kern = walk(kernel.ram, kernel.kernel_cr3(), kernel.geometry)
    mine = [a for a in kernel.alloc.log if a.owner == name]
    by_phase = Counter(a.phase.value for a in mine)
    # Only the kernel half: the user half's tables are shared by construction.
    kernel_tables = kern.kernel_half_table_frames()
    user_tables = user.kernel_half_table_frames()
    shared = int(np.isin(user_tables, kernel_tables).sum())
    regions, region_rights = region_pages(user, kernel.geometry.levels)
    return DesignReport(
        design=name,
        profile=kernel.profile.name,
        cpus=kernel.nr_cpus,
        levels=kernel.geometry.levels,
        user_table_pages=sum(a.pages for a in mine),
        pte_writes=sum(n for (owner, _), n in kernel.writes.items() if owner == name),
        ap_allocations=sum(1 for a in mine if a.phase is Phase.AP_BRINGUP),
        ap_writes=kernel.writes[(name, Phase.AP_BRINGUP)],
        allocations_by_phase=dict(by_phase),
        violations=[f"{a.phase.value}: {a.purpose}: {a.violation}" for a in kernel.alloc.violations()],
        tables_shared_with_kernel=shared,
        tables_user_only=len(user_tables) - shared,
        user_kernel_pages=sum(regions.values()),
        user_regions=regions,
        user_rights=region_rights,
        cea_divergences=diff(user, kern, kernel.area_base, kernel.area_end),
        kernel_cea_tables=sum(a.pages for a in kernel.alloc.log
                              if a.owner == "kernel" and a.purpose == CEA_TABLE_PURPOSE),
        cea_seed=kernel.seed if kernel.profile.random_cea_slots and kernel.kaslr else None,
    )


def compare(profile: str = "linux-6.1", cpus: int = 4, levels: int = 4,
            designs: list[str] | None = None, kaslr: bool = True, seed: int = 0) -> list[DesignReport]:
    """Boot one kernel per design (the same random slots for all: one seed) and measure each."""
    from ptilab.pti import DESIGNS

    chosen = designs or list(DESIGNS)
    return [measure(boot(profile, d, cpus, levels, kaslr, seed)) for d in progress.over(chosen, "comparing designs")]
