"""Rich tables for the terminal (plain text when stdout is not one)."""

from __future__ import annotations

from rich.table import Table

from ptilab.audit.image import ImageError
from ptilab.compare.layout_change import Outcome
from ptilab.compare.metrics import DesignReport
from ptilab.mmu.cost import WorkloadCost


def _kib(n: int) -> str:
    return f"{n // 1024} KiB"


def compare_table(reports: list[DesignReport]) -> Table:
    first = reports[0]
    slots = "" if first.cea_seed is None else f", random cpu_entry_area slots (seed {first.cea_seed})"
    t = Table(title=f"PTI designs on {first.profile}, {first.cpus} CPUs, {first.levels}-level paging{slots}",
              caption="user tables: page-table pages the design allocated; writes: entries it wrote; "
                      "shared/own: kernel-half tables of the user view shared with the kernel or its own; "
                      "kernel cea tables: the kernel's own tables for the cpu_entry_area")
    for col in ("design", "user tables", "writes", "AP work", "allocations by phase", "allocator bugs",
                "tables shared/own", "kernel pages seen by user", "cpu_entry_area vs kernel", "kernel cea tables"):
        t.add_column(col, overflow="fold")
    for r in reports:
        ap = f"{r.ap_allocations} allocs, {r.ap_writes} writes" if r.ap_work else "none"
        phases = ", ".join(f"{k} {v}" for k, v in r.allocations_by_phase.items()) or "-"
        div = "identical" if not r.cea_divergences else "; ".join(
            f"{d.kind} {d.va:#x}+{d.pages}p (user {d.user}, kernel {d.kernel})" for d in r.cea_divergences[:3]) + (
            f"; +{len(r.cea_divergences) - 3} more" if len(r.cea_divergences) > 3 else "")
        t.add_row(r.design, f"{r.user_table_pages} ({_kib(r.user_table_bytes)})", str(r.pte_writes), ap, phases,
                  str(len(r.violations)) if r.violations else "none",
                  f"{r.tables_shared_with_kernel}/{r.tables_user_only}", str(r.user_kernel_pages), div,
                  str(r.kernel_cea_tables))
    return t


def layout_change_table(outcomes: list[Outcome], profile: str) -> Table:
    t = Table(title=f"Which designs stay correct, unmodified, when {profile}'s cpu_entry_area layout changes")
    t.add_column("layout change")
    t.add_column("design")
    t.add_column("correct")
    t.add_column("detail", overflow="fold")
    for o in outcomes:
        t.add_row(o.change, o.design, "yes" if o.correct else "NO", o.detail)
    return t


def findings_table(findings: list, title: str) -> Table:
    t = Table(title=title, show_lines=True)
    t.add_column("severity")
    t.add_column("id")
    t.add_column("finding", overflow="fold")
    for f in findings:
        where = ""
        if f.spans:
            first = f.spans[0]
            where = f"\n[{first.start:#x}-{first.end:#x} {first.rights}" + (
                f", +{len(f.spans) - 1} more]" if len(f.spans) > 1 else "]")
        t.add_row(f.severity.name.lower(), f.id, f"{f.title}: {f.explanation}{where}")
    return t


def refill_table(costs: list["WorkloadCost"]) -> Table:
    """One row per (NR_CPUS, design, workload): the cold refill and what the warm run still misses."""
    first = costs[0]
    t = Table(title=f"TLB refill cost on {first.profile}, {first.levels}-level paging, "
                    f"PCID {'on' if first.pcid else 'off'}, CPU {first.cpu}, {first.core} TLBs",
              caption="cold: empty TLBs, paging-structure and data caches; warm: the same workload again at once. "
                      "L1/STLB/walk: where each access found its translation (first-level DTLB or ITLB, "
                      "second-level TLB, page walk); PSC: walks a paging-structure cache shortened; "
                      "lines: distinct 64-byte lines the walks loaded; both views: of those, lines walked from "
                      "the kernel and the user tables alike")
    for col in ("NR_CPUS", "design", "workload", "accesses", "L1/STLB/walk", "PSC", "walk loads", "lines",
                "both views", "warm misses", "warm loads", "faults"):
        t.add_column(col, overflow="fold")
    for c in costs:
        faults = "; ".join(c.cold.faults[:2]) + (f"; +{len(c.cold.faults) - 2} more" if len(c.cold.faults) > 2
                                                  else "") if c.cold.faults else "none"
        levels = f"{c.cold.l1_hits}/{c.cold.stlb_hits}/{c.cold.tlb_misses}"
        t.add_row(str(c.cpus), c.design, c.workload, str(c.cold.accesses), levels, str(c.cold.psc_hits),
                  str(c.cold.walk_loads), str(c.cold.lines), str(c.cold.lines_both_views), str(c.warm.tlb_misses),
                  str(c.warm.walk_loads), faults)
    return t


def _size(n: int) -> str:
    """Bytes as ptdump prints a size: shifted by 10 while divisible by 1024 (132K, 2M)."""
    unit = 0
    while n and n % 1024 == 0 and unit < 4:
        n //= 1024
        unit += 1
    return f"{n}{' KMGT'[unit].strip()}"


def user_view_text(user_view: dict[str, int]) -> str:
    """What a user view maps of the kernel, e.g. 'cpu_entry_area 132K, entry text 2M'."""
    return ", ".join(f"{kind} {_size(n)}" for kind, n in user_view.items()) or "nothing"


def scan_table(scans: list, several: bool) -> Table:
    """One row per address space found (per image when several; an unreadable image is one row)."""
    t = Table(title="Address spaces found by their kernel half" + (" in " + scans[0].path if not several else ""))
    cols = (["image"] if several else []) + ["kernel PGD", "user PGD", "kind", "user view maps of the kernel",
                                             "verdict"]
    for col in cols:
        t.add_column(col, overflow="fold")
    for scan in scans:
        if isinstance(scan, ImageError):
            t.add_row(*([scan.path] if several else []), "-", "-", "-", "-", f"error: {scan.message}")
            continue
        for s in scan.spaces:
            t.add_row(*([scan.path] if several else []), f"{s.kernel_pgd:#x}",
                      "-" if s.user_pgd is None else f"{s.user_pgd:#x}", s.kind,
                      "-" if s.kind == "kernel-only" else user_view_text(s.user_view), s.verdict)
    return t


def audit_images_table(rows: list) -> Table:
    """One row per image audited: its PGD pair, its CPU's exposure and the most severe findings."""
    t = Table(title=f"PTI audit of {len(rows)} images")
    for col in ("image", "CR3", "PGD pair", "CPU vs Meltdown", "worst", "findings"):
        t.add_column(col, overflow="fold")
    for row in rows:
        if isinstance(row, ImageError):
            t.add_row(row.path, "-", "-", "-", "error", row.message)
            continue
        pair = row.pair
        worst = row.findings[0].severity.name.lower() if row.findings else "none"
        t.add_row(row.image, f"{row.cr3:#x}", f"{pair.kernel_pgd:#x}/{pair.user_pgd:#x}"
                  + ("" if pair.is_pti else " (not PTI)"), row.exposure.meltdown.value, worst,
                  ", ".join(f.id for f in row.findings) or "-")
    return t


def _config_cells(c) -> list[str]:
    k = c.config
    return ["on" if k.pti else "off", "on" if k.pcid else "off", k.global_ or "-", k.design or "-"]


def overhead_table(costs: list, title: str) -> Table:
    """One row per configuration (and working set, when several): ptilab.mmu.overhead.CallCost."""
    sweep = len({c.working_set for c in costs}) > 1
    t = Table(title=title, caption="cycles: the measured PTI-off base plus count x latency of each modelled event "
                                   "(ptilab.mmu.cycles); ratio: calls/s over calls/s with PTI off (same PCID "
                                   "setting); walks: page walks per call")
    for col in (["working set"] if sweep else []) + ["PTI", "PCID", "global", "design", "cycles/call", "calls/s",
                                                     "ratio", "walks"]:
        t.add_column(col, overflow="fold")
    for c in costs:
        t.add_row(*([str(c.working_set)] if sweep else []), *_config_cells(c), f"{c.cycles_per_call:.0f}",
                  f"{c.calls_per_second / 1e6:.2f} M", f"{c.throughput_ratio:.3f}", f"{c.tlb_misses:g}")
    return t


def hansen_table(rows: list[tuple[str, float, float]]) -> Table:
    """The model's throughput ratios beside Hansen's lseek1 measurements."""
    t = Table(title="lseek1 against no KAISER: Hansen's measurement (LKML, 2017-11-01) and the model",
              caption="off by: the model's ratio over Hansen's, less one (the test's bound is 15 %)")
    for col in ("configuration", "Hansen", "model", "off by"):
        t.add_column(col)
    for label, measured, model in rows:
        t.add_row(label, f"{measured:.3f}", f"{model:.3f}", f"{model / measured - 1:+.0%}")
    return t


def refill_cycles_table(rows: list[tuple[str, str, float, float]]) -> Table:
    """Per core and design: cycles per lseek call and per cold refill of the syscall workload."""
    t = Table(title="The seed's 'wee bit faster', in cycles (PTI, PCID, entry global; cold refill: linux-4.15 syscall)",
              caption="per call: the lseek loop's steady state; cold refill: empty TLBs and caches, walk loads the "
                      "data cache misses served by L2")
    for col in ("core", "design", "cycles/call", "cycles/cold refill"):
        t.add_column(col)
    for core, design, call, refill in rows:
        t.add_row(core, design, f"{call:.0f}", f"{refill:.0f}")
    return t


def view_diff_table(result) -> Table:
    """ptilab diff's changes: what B exposes more, what moved, what is gone."""
    t = Table(title="The kernel as the user tables map it: B against A")
    for col in ("change", "region", "first address", "pages", "ranges", "rights"):
        t.add_column(col, overflow="fold")
    for c in [*result.exposed, *result.moved, *result.gone]:
        if c.kind == "moved":
            rights = c.rights + (f", by {c.shift:+#x}" if c.shift is not None else ", rearranged")
        elif c.was:
            rights = f"{c.was} -> {c.rights}"
        else:
            rights = c.rights
        t.add_row(c.kind, c.region, f"{c.va:#x}", str(c.pages), str(c.ranges), rights)
    return t


def audit_header(result) -> list[str]:
    """The lines above an audit's findings: the live kernel, the PGD pair, VMCOREINFO, the machine."""
    lines = []
    if result.live is not None:
        k = result.live
        lines.append(f"running kernel {k.info.osrelease}: {k.kcore.path}, init_top_pgt at {k.info.kernel_pgd:#x}, "
                     f"{k.info.levels}-level, KERNELOFFSET {k.info.kernel_offset:#x}")
    if result.pair is not None:
        verdict = "a Linux PTI pair" if result.pair.is_pti else "not a PTI pair"
        lines.append(f"PGD pair: kernel {result.pair.kernel_pgd:#x}, user {result.pair.user_pgd:#x}: {verdict}"
                     + (f"; KASLR slide {result.kaslr_slide:#x}" if result.kaslr_slide else ""))
    info = result.vmcoreinfo
    if info is not None and result.live is None:
        where = "" if info.found_at is None else f" (found in memory at pa {info.found_at:#x})"
        lines.append(f"VMCOREINFO{where}: {info.osrelease}, KERNELOFFSET {info.kernel_offset:#x} (the KASLR slide), "
                     f"init_top_pgt at {info.kernel_pgd:#x}, {info.levels}-level, "
                     f"{result.prstatus_cpus} CPU(s) in NT_PRSTATUS notes")
    lines.extend(machine_lines(result.exposure))
    return lines


def machine_lines(x) -> list[str]:
    """What is known of the CPU and of KASLR, and from where: a line each."""
    from ptilab.linux.exposure import Meltdown

    cpu = f"{x.cpu}: " if x.cpu else ""
    if x.meltdown is Meltdown.UNKNOWN:
        melt = "Meltdown exposure unknown (no kernel log or sysfs to tell; see --cpu-meltdown)"
    else:
        melt = f"{x.meltdown.value} by Meltdown" if x.meltdown is not Meltdown.XEN_PV else x.meltdown.value
        melt += f" ({x.because()})"
    if x.conflicts:
        melt += "; disagreeing: " + "; ".join(map(str, x.conflicts))
    kaslr = ("unknown (nothing in the image says)" if x.kaslr is None else
             f"{'on' if x.kaslr else 'off'} ({'; '.join(map(str, x.kaslr_evidence))})")
    return [f"CPU: {cpu}{melt}", f"KASLR: {kaslr}"]
