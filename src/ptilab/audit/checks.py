"""PTI's promises, checked on any pair of views: modelled, from an image, or from ptdump text.

Each check reads plain range arrays (ptilab.paging.RANGE_DTYPE), never memory,
so a view parsed from ptdump text is judged exactly like a walked one. A
walked view comes summarised (Walk.distinct, with how many times each record
appears: ESPfix maps a few pages millions of times with many CPUs), and every
count and sum below weighs a record by its copies instead of expanding them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ptilab.audit.findings import Finding, Severity, Span
from ptilab.errors import WalkTooLarge
from ptilab.linux.exposure import UNKNOWN, Exposure, Meltdown
from ptilab.linux.profiles import CPU_ENTRY_AREA_BASE, START_KERNEL_MAP
from ptilab.linux.regions import MODULES_VADDR, PTI_OFF_BYTES, class_edges, classify_ranges
from ptilab.linux.regions import count as _count
from ptilab.linux.regions import direct_map as _direct_map
from ptilab.linux.regions import present_kernel_half as _present_kernel_half
from ptilab.linux.regions import weighed_bytes as _bytes
from ptilab.linux.regions import within as _within
from ptilab.paging import EFF_NX, EFF_RW, EFF_US, Anomaly, Geometry, Walk
from ptilab.paging import entry as e


@dataclass
class Views:
    """What an audit looks at. The user view is the tree CR3 points at while
    a CPU runs user code; the kernel view is its PTI twin, when there is one."""

    geometry: Geometry
    user: np.ndarray
    kernel: np.ndarray | None = None
    kernel_pgd: np.ndarray | None = None  # the 512 top-level entries, when read from memory
    user_pgd: np.ndarray | None = None
    anomalies: list[Anomaly] = field(default_factory=list)
    symbols: dict[str, int] = field(default_factory=dict)
    nr_cpus_hint: int = 8192
    # Per range: how many times it appears in the address space (Walk.multiplicity()); None: once each.
    user_copies: np.ndarray | None = None
    kernel_copies: np.ndarray | None = None
    # What is known of the machine behind the tables: the CPU's Meltdown exposure, KASLR (ptilab.linux.exposure).
    exposure: Exposure = UNKNOWN

    @classmethod
    def from_walks(cls, user: "Walk", kernel: "Walk | None" = None, **kw) -> "Views":
        """The views of two walks: summarised (each distinct range and its
        number of copies) when every alias repeats its source inside the same
        class of address (ESPfix's do: one P4D), else expanded, because a copy
        elsewhere (a hostile table shared between user and kernel halves) is
        judged by where it is, not by where its source is. Tables shared too
        many ways to expand are judged by their runs (ptdump's view: frames
        ignored, which only the ESPfix summary counts)."""
        edges = class_edges(user.geometry, kw.get("symbols") or {})
        walks = [w for w in (user, kernel) if w is not None]
        if all(_aliases_stay_within(w, edges) for w in walks):
            return cls(user.geometry, user.distinct, kernel.distinct if kernel else None,
                       user_copies=user.multiplicity(), kernel_copies=kernel.multiplicity() if kernel else None,
                       **kw)
        try:
            return cls(user.geometry, user.ranges, kernel.ranges if kernel else None, **kw)
        except WalkTooLarge:
            return cls(user.geometry, user.runs(), kernel.runs() if kernel else None, **kw)

    def copies(self, view: str) -> np.ndarray:
        r = self.user if view == "user" else self.kernel
        given = self.user_copies if view == "user" else self.kernel_copies
        return np.ones(len(r), np.int64) if given is None else given


def _aliases_stay_within(w: "Walk", edges: np.ndarray) -> bool:
    """Whether every alias's reach and its source's lie between the same two edges."""
    a = w.aliases
    if not len(a):
        return True
    last = a["va"] + (a["size"] - np.uint64(1))
    at = np.searchsorted(edges, a["va"], side="right")
    return bool((at == np.searchsorted(edges, last, side="right")).all()
                and (at == np.searchsorted(edges, a["source"], side="right")).all())


def rights(eff: int, prot: int) -> str:
    """ptdump-like words: 'USR RW NX GLB'."""
    words = ["USR"] if eff & EFF_US else []
    words.append("RW" if eff & EFF_RW else "ro")
    words.append("NX" if eff & EFF_NX else "x")
    if prot & e.G:
        words.append("GLB")
    return " ".join(words)


def _spans(r: np.ndarray, view: str, label: str = "", limit: int = 64,
           copies: np.ndarray | None = None) -> tuple[Span, ...]:
    """The first ranges as spans; a range the tables repeat elsewhere (a shared
    table's alias) says how many times it appears instead of listing each."""
    out = []
    many = [1] * min(limit, len(r)) if copies is None else copies[:limit].tolist()
    for va, size, eff, prot, n in zip(r["va"][:limit].tolist(), r["size"][:limit].tolist(),
                                      r["eff"][:limit].tolist(), r["prot"][:limit].tolist(), many):
        note = label if n == 1 else ", ".join(filter(None, (label, f"mapped {n} times")))
        out.append(Span(va, (va + size) & 0xFFFF_FFFF_FFFF_FFFF, view, rights(eff, prot), note))
    return tuple(out)


def classify(views: Views) -> dict[str, np.ndarray]:
    """Sort the user view's kernel-half mappings into what PTI allows there
    and what it does not (ptilab.linux.regions.classify_ranges())."""
    return classify_ranges(views.user, views.copies("user"), views.geometry, views.symbols, views.nr_cpus_hint)


def check_pti_off(views: Views, kinds: dict[str, np.ndarray]) -> list[Finding]:
    r, copies = kinds["_ranges"], kinds["_copies"]
    if not _pti_off(views, kinds):
        return []
    leaked = _bytes(r, copies, kinds["leak"])
    direct = _bytes(r, copies, _within(r, *_direct_map(views.geometry)))
    why = ("the user and kernel views are the same tree" if _same_tree(views) else
           f"the tables used in user mode map {leaked >> 20} MiB of the kernel"
           + (f", {direct >> 20} MiB of it the direct map (all of physical memory)" if direct else ""))
    severity, title, verdict = _pti_off_verdict(views.exposure)
    return [Finding("PTI-OFF", severity, title,
                    f"PTI promises that while a CPU runs user code its page tables map only what kernel entry "
                    f"needs; here {why}. {verdict}",
                    _spans(r[kinds["leak"]], "user", copies=copies[kinds["leak"]]))]


def _same_tree(views: Views) -> bool:
    return views.kernel is not None and len(views.kernel) == len(views.user) and bool(
        (views.kernel["va"] == views.user["va"]).all() and (views.kernel["pa"] == views.user["pa"]).all()
        and (views.copies("kernel") == views.copies("user")).all())


def _pti_off(views: Views, kinds: dict[str, np.ndarray]) -> bool:
    """The user view maps the kernel wholesale: no isolation at all."""
    r, copies = kinds["_ranges"], kinds["_copies"]
    # region_of() over every range, vectorised: the direct map is one interval.
    direct = _bytes(r, copies, _within(r, *_direct_map(views.geometry)))
    return _bytes(r, copies, kinds["leak"]) >= PTI_OFF_BYTES or direct >= PTI_OFF_BYTES or _same_tree(views)


def _pti_off_verdict(x: Exposure) -> tuple[Severity, str, str]:
    """PTI-OFF's severity follows the CPU (docs/design.md, "Severity policy"), and names its evidence."""
    said = x.because()
    cpu = f" ({x.cpu})" if x.cpu else ""
    if x.meltdown is Meltdown.AFFECTED:
        return (Severity.CRITICAL, "page-table isolation is off on a CPU affected by Meltdown",
                f"The CPU{cpu} is affected by Meltdown ({said}): a Meltdown attack (CVE-2017-5754) can read any "
                f"kernel memory, and with it all of RAM through the direct map. Boot without pti=off, nopti or "
                f"mitigations=off.")
    if x.meltdown is Meltdown.NOT_AFFECTED:
        return (Severity.INFO, "page-table isolation is off, by design: the CPU is not affected by Meltdown",
                f"The CPU{cpu} is not affected by Meltdown ({said}): it does not speculate past the US bit, so "
                f"Linux leaves PTI off on it (cpu_vuln_whitelist, ARCH_CAPABILITIES.RDCL_NO). What the user "
                f"tables map still matters for KASLR (see KASLR-KERNEL-MAPPED).")
    if x.meltdown is Meltdown.XEN_PV:
        return (Severity.LOW, "page-table isolation is off, left to the hypervisor (Xen PV)",
                f"This is a Xen PV guest ({said}): Linux turns PTI off there by design, and isolation is the "
                f"hypervisor's job (Xen's XPTI). Nothing in these tables says whether the hypervisor does it: "
                f"check Xen's xpti= setting.")
    return (Severity.HIGH, "page-table isolation is off; nothing tells whether the CPU is affected by Meltdown",
            "No evidence says whether this CPU is affected (no kernel log in the image, no sysfs): on an affected "
            "CPU (most Intel CPUs before Cascade Lake) a Meltdown attack (CVE-2017-5754) can read any kernel memory "
            "and all of RAM through the direct map; on an unaffected one (every AMD and Hygon CPU, Intel with "
            "RDCL_NO) Linux leaves PTI off by design. Give --cpu-meltdown affected|not-affected to say which.")


def check_leaks(views: Views, kinds: dict[str, np.ndarray]) -> list[Finding]:
    r, copies = kinds["_ranges"], kinds["_copies"]
    leak, leak_copies = r[kinds["leak"]], copies[kinds["leak"]]
    if not len(leak) or _bytes(leak, leak_copies) >= PTI_OFF_BYTES:
        return []
    # The kernel text clone is judged apart (check_kernel_text_clone): classify() keeps it out of "leak".
    return [Finding(
        "PTI-LEAK", Severity.HIGH, "kernel memory mapped in the user tables",
        f"{_count(leak_copies, slice(None))} kernel range(s), {_bytes(leak, leak_copies) >> 10} KiB, are present in "
        f"the tables used in user mode but are none of what PTI allows there (cpu_entry_area, entry text, espfix "
        f"stacks, per-CPU cpu_tss_rw). A present translation is all Meltdown needs: the US bit does not "
        f"stop a speculative read.", _spans(leak, "user", "not allowed under PTI", copies=leak_copies))]


def check_kernel_text_clone(views: Views, kinds: dict[str, np.ndarray]) -> list[Finding]:
    r, copies = kinds["_ranges"], kinds["_copies"]
    clone = kinds["kernel text clone"]
    if not clone.any() or _bytes(r, copies, kinds["leak"]) >= PTI_OFF_BYTES:
        return []
    return [Finding(
        "PTI-KERNEL-IMAGE", Severity.LOW, "kernel text and rodata cloned into the user tables",
        f"{_bytes(r, copies, clone) >> 10} KiB of the kernel image (read-only: text and rodata) are mapped, global, "
        f"while user code runs. Linux does this on purpose with PTI in auto mode on a CPU without PCID "
        f"(pti_clone_kernel_text() when pti_kernel_image_global_ok()): global kernel text saves TLB misses on "
        f"every entry. The price under Meltdown: the kernel's code and constants are readable, so KASLR is gone; "
        f"no data is (nothing past __end_rodata_aligned is cloned, and anything writable here would be a PTI-LEAK). "
        f"pti=on, or a CPU with PCID, keeps it out.",
        _spans(r[clone], "user", "kernel text clone", copies=copies[clone]))]


def check_user_view_summary(views: Views, kinds: dict[str, np.ndarray]) -> list[Finding]:
    """What the user view legitimately exposes, named piece by piece."""
    from ptilab.audit.labels import cea_piece

    r, copies = kinds["_ranges"], kinds["_copies"]
    if _bytes(r, copies, kinds["leak"]) >= PTI_OFF_BYTES:
        return []  # PTI-OFF says it all: nothing here is "what entry needs"
    parts = []
    spans: list[Span] = []
    for kind in ("cpu_entry_area", "entry text", "espfix", "cpu_tss_rw pages", "vsyscall page"):
        sel, count = r[kinds[kind]], _count(copies, kinds[kind])
        if not len(sel):
            continue
        pages = _bytes(r, copies, kinds[kind]) // e.PAGE_SIZE
        frames = len(np.unique(sel["pa"]))
        if kind == "cpu_entry_area":
            names = sorted({cea_piece(int(va)) for va in sel["va"].tolist()})
            parts.append(f"the cpu_entry_area ({pages} pages: {', '.join(names)})")
        elif kind == "espfix":
            parts.append(f"the espfix stacks ({frames} page(s) aliased {count} times, summarised)")
        elif kind == "cpu_tss_rw pages":
            parts.append(f"{count} per-CPU cpu_tss_rw page(s) (SYSCALL64 scratch)")
        else:
            parts.append(f"the {kind} ({pages * 4} KiB)")
        spans.extend(_spans(sel, "user", kind, limit=16, copies=copies[kinds[kind]]))
    if not parts:
        return []
    if not _cea_fixed_slot(kinds).any():
        where = "the cpu_entry_area is not at the fixed address: its per-CPU slots are randomised"
    elif views.exposure.meltdown is Meltdown.NOT_AFFECTED:
        where = "the cpu_entry_area sits at its fixed address, which only a Meltdown read would exploit"
    else:
        where = "see PTI-CEA-FIXED for the addresses they reveal"
    return [Finding("PTI-USER-VIEW", Severity.INFO, "what the user tables map of the kernel",
                    "While user code runs, the kernel half maps only " + "; ".join(parts) + ". These are what "
                    "entry and exit need before and after the CR3 switch; each is readable by Meltdown, which is "
                    f"why they hold no secrets ({where}).", tuple(spans))]


def check_wx(views: Views, kinds: dict[str, np.ndarray]) -> list[Finding]:
    found = []
    for name, r in (("user", views.user), ("kernel", views.kernel)):
        if r is None:
            continue
        wx = _present_kernel_half(r, views.geometry) & ((r["eff"] & EFF_RW) != 0) & ((r["eff"] & EFF_NX) == 0)
        kernel_half = r[wx]
        if len(kernel_half):
            found.append(Finding(
                f"WX-{name.upper()}", Severity.HIGH, f"writable and executable kernel memory ({name} view)",
                f"{_count(views.copies(name), wx)} kernel range(s) are both writable and executable, what CONFIG_DEBUG_WX "
                f"warns about at boot: an attacker who can write there can run code in ring 0.",
                _spans(kernel_half, name, "W+X", copies=views.copies(name)[wx])))
    return found


def check_user_bit(views: Views, kinds: dict[str, np.ndarray]) -> list[Finding]:
    found = []
    for name, r in (("user", views.user), ("kernel", views.kernel)):
        if r is None:
            continue
        us = _present_kernel_half(r, views.geometry) & ((r["eff"] & EFF_US) != 0)
        bad = r[us]
        if len(bad):
            found.append(Finding(
                "KERNEL-USER-BIT", Severity.CRITICAL, f"kernel pages accessible from user mode ({name} view)",
                f"{_count(views.copies(name), us)} kernel-half range(s) have US set at every level: user code can read them "
                f"architecturally, no side channel needed.", _spans(bad, name, copies=views.copies(name)[us])))
    return found


def check_executable(views: Views, kinds: dict[str, np.ndarray]) -> list[Finding]:
    r = kinds["_ranges"]
    if _pti_off(views, kinds):
        return []  # without isolation all kernel text is there by design: PTI-OFF says so, as severe as the CPU
    x = ((r["eff"] & EFF_NX) == 0) & ~kinds["entry text"] & ~kinds["kernel text clone"]
    if not x.any():
        return []
    return [Finding("USER-VIEW-KERNEL-EXEC", Severity.HIGH, "executable kernel code in the user tables beyond the entry text",
                    f"{_count(kinds['_copies'], x)} kernel range(s) other than the entry text are executable while user code "
                    f"runs: gadgets for speculative and ROP attacks that PTI means to take away.",
                    _spans(r[x], "user", copies=kinds["_copies"][x]))]


def check_global(views: Views, kinds: dict[str, np.ndarray]) -> list[Finding]:
    r = kinds["_ranges"]
    if _pti_off(views, kinds):
        return []  # global kernel pages matter only where PTI unmaps the rest
    # The cpu_entry_area, the cloned entry-text PMDs and the espfix pages are
    # global on purpose (cea_set_pte(), pti_clone_pgtable(), init_espfix_ap()).
    glb = ((r["prot"] & np.uint64(e.G)) != 0) & ~kinds["cpu_entry_area"] & ~kinds["entry text"] & ~kinds["espfix"]
    glb &= ~kinds["kernel text clone"]  # set_memory_global() in pti_clone_kernel_text()
    if not glb.any():
        return []
    return [Finding("USER-VIEW-GLOBAL", Severity.MEDIUM, "global kernel pages in the user tables",
                    f"{_count(kinds['_copies'], glb)} kernel range(s) beyond the cpu_entry_area, entry text and espfix are global: "
                    f"their TLB entries survive the CR3 switch to user mode, so they stay readable to "
                    f"Meltdown even after the kernel unmaps them.", _spans(r[glb], "user", copies=kinds["_copies"][glb]))]


def check_kernel_pgd_nx(views: Views, kinds: dict[str, np.ndarray]) -> list[Finding]:
    if views.kernel_pgd is None:
        return []
    half = views.kernel_pgd[:256]
    bad = np.flatnonzero(((half & np.uint64(e.P)) != 0) & ((half >> np.uint64(63)) == 0))
    if not len(bad):
        return []
    return [Finding("KERNEL-PGD-USER-EXEC", Severity.HIGH, "user-half entries of the kernel PGD without NX",
                    f"{len(bad)} of the kernel PGD's user-half entries (slots {', '.join(map(str, bad[:8]))}) "
                    f"lack NX. Linux sets NX on the kernel copy of every user-half PGD entry "
                    f"(pti_set_user_pgtbl()) so that a return to user mode that forgot to switch CR3 cannot "
                    f"execute user code with the kernel's tables; the user PGD's copies carry none.")]


def _cea_fixed_slot(kinds: dict[str, np.ndarray]) -> np.ndarray:
    """Which cpu_entry_area ranges hold CPU 0's GDT page at its pre-6.2, unrandomised address."""
    r = kinds["_ranges"][kinds["cpu_entry_area"]]
    gdt0 = np.uint64(CPU_ENTRY_AREA_BASE + 0x1000)
    return (r["va"] <= gdt0) & (r["va"] + r["size"] > gdt0)


def check_cea_fixed(views: Views, kinds: dict[str, np.ndarray]) -> list[Finding]:
    r, copies = kinds["_ranges"][kinds["cpu_entry_area"]], kinds["_copies"][kinds["cpu_entry_area"]]
    gdt0 = CPU_ENTRY_AREA_BASE + 0x1000
    at = _cea_fixed_slot(kinds)
    hit = r[at]
    # The fixed slot leaks only to a Meltdown read, and with PTI off PTI-OFF says more.
    if not len(hit) or views.exposure.meltdown is Meltdown.NOT_AFFECTED or _pti_off(views, kinds):
        return []
    return [Finding("PTI-CEA-FIXED", Severity.LOW, "cpu_entry_area at its fixed, guessable address",
                    f"CPU 0's area starts at {gdt0:#x}, the address every kernel without randomised "
                    f"cpu_entry_area uses: every process knows where the IDT, GDT, TSS and IST stacks are, "
                    f"and a Meltdown read of them reveals kernel pointers (IDT handler addresses, the TSS's "
                    f"stack pointers) and with them the KASLR offsets. Linux 6.2 randomises each CPU's slot "
                    f"(CONFIG_RANDOMIZE_MEMORY).", _spans(hit, "user", "cpu_entry_area", copies=copies[at]))]


def _kaslr_words(x: Exposure) -> str | None:
    """How the finding speaks of KASLR: None when it is known to be off (nothing to leak)."""
    if x.kaslr is False:
        return None
    if x.kaslr:
        return "KASLR is on (" + "; ".join(map(str, x.kaslr_evidence)) + ")"
    return "nothing tells whether KASLR is on; if it is"


def check_kaslr_entry_text(views: Views, kinds: dict[str, np.ndarray]) -> list[Finding]:
    """EntryBleed (CVE-2022-4543): PTI's user tables map the entry text inside the slid kernel image."""
    r, copies = kinds["_ranges"], kinds["_copies"]
    entry = kinds["entry text"] & ((r["eff"] & EFF_NX) == 0)
    words = _kaslr_words(views.exposure)
    if words is None or not entry.any() or _pti_off(views, kinds) or kinds["kernel text clone"].any():
        return []
    glb = bool(((r["prot"][entry] & np.uint64(e.G)) != 0).any())
    return [Finding(
        "KASLR-ENTRYBLEED", Severity.MEDIUM, "the entry text in the user tables gives away the KASLR base",
        f"{words}, yet the tables used in user mode map the entry text (entry_SYSCALL_64 and the rest of "
        f"pti_clone_entry_text()'s PMDs) at its slid address inside the kernel image"
        f"{', global' if glb else ''}. EntryBleed (CVE-2022-4543; Liu, Ravichandran and Yan, HASP '23) times "
        f"prefetch over the 512 2 MiB candidates from user mode after a syscall and finds the one whose "
        f"translation is cached: the kernel base in under a second, shown on Intel CPUs from Haswell to Coffee "
        f"Lake, on any kernel with PTI and KASLR since 4.20 (no Meltdown needed, so on every CPU that runs PTI "
        f"and keeps that translation). Mainline has no fix. The kernel could map entry code the user tables "
        f"need at an address randomised apart from the image, as the SYSCALL64 trampoline in the "
        f"cpu_entry_area did until 4.20 (bf904d2762ee).", _spans(r[entry], "user", "entry text", copies=copies[entry]))]


def check_kaslr_kernel_mapped(views: Views, kinds: dict[str, np.ndarray]) -> list[Finding]:
    """Prefetch and TLB timing find a kernel image that the user tables map (PTI off, or the text clone)."""
    r, copies = kinds["_ranges"], kinds["_copies"]
    image = _within(r, START_KERNEL_MAP, MODULES_VADDR)
    words = _kaslr_words(views.exposure)
    off = _pti_off(views, kinds)
    if words is None or not image.any() or not (off or kinds["kernel text clone"].any()):
        return []
    what = ("PTI is off, so the tables used in user mode map the whole kernel" if off else
            "the kernel image's text and rodata are cloned into the user tables (PTI-KERNEL-IMAGE)")
    return [Finding(
        "KASLR-KERNEL-MAPPED", Severity.MEDIUM, "the kernel image mapped in user mode gives away the KASLR base",
        f"{words}; {what}, {_bytes(r, copies, image) >> 20} MiB of the kernel image at its slid address. Timing "
        f"prefetch or a faulting access from user mode tells a mapped kernel page from an unmapped one on any CPU, "
        f"no Meltdown needed: Gruss et al., \"Prefetch Side-Channel Attacks\" (CCS 2016) on Intel, Lipp et al., "
        f"\"AMD Prefetch Attacks through Power and Time\" (USENIX Security 2022, CVE-2021-26318) on AMD. "
        f"Isolation (pti=on) unmaps the image, leaving only the entry text (see KASLR-ENTRYBLEED).",
        _spans(r[image], "user", "kernel image", limit=16, copies=copies[image]))]


def check_kaslr_off(views: Views, kinds: dict[str, np.ndarray]) -> list[Finding]:
    x = views.exposure
    if x.kaslr is not False:
        return []
    return [Finding("KASLR-OFF", Severity.INFO, "KASLR is off: the kernel sits at its link-time addresses",
                    f"{'; '.join(map(str, x.kaslr_evidence))}: every kernel address is the one System.map names, "
                    f"so no mapping here leaks a secret base; an attacker needs none.")]


def check_anomalies(views: Views, kinds: dict[str, np.ndarray]) -> list[Finding]:
    return [Finding(f"TABLE-{a.kind.upper()}", Severity.HIGH, f"malformed page tables: {a.kind}", a.detail)
            for a in views.anomalies]


def entry_mapped(user: np.ndarray, geometry: Geometry) -> bool:
    """Whether a CPU running on these tables could enter the kernel: SYSCALL,
    interrupts and exceptions jump to kernel code (entry_SYSCALL_64, the IDT's
    handlers) before any CR3 switch, so some kernel-half page must be present
    and executable. Every design and every real kernel maps its entry text."""
    present = _present_kernel_half(user, geometry)
    return bool((present & ((user["eff"] & EFF_NX) == 0)).any())


def check_no_entry(views: Views, kinds: dict[str, np.ndarray]) -> list[Finding]:
    if entry_mapped(views.user, views.geometry):
        return []
    present = (views.user["prot"] & np.uint64(e.P)) != 0
    copies = views.copies("user")
    kernel = _present_kernel_half(views.user, views.geometry)
    return [Finding("TABLES-NO-ENTRY", Severity.HIGH, "no CPU could run on these tables",
                    f"they map no executable kernel page ({_bytes(views.user, copies, present & ~kernel) >> 10} KiB "
                    f"of user space, {_bytes(views.user, copies, kernel) >> 10} KiB of the kernel half), so a "
                    f"syscall, interrupt or exception taken on them would fault with no handler to reach: they are "
                    f"not the page tables of a running CPU. A wrong CR3, freed tables, or not page tables at all: "
                    f"nothing else this audit says about them means anything.")]


CHECKS = (check_no_entry, check_pti_off, check_leaks, check_kernel_text_clone, check_user_view_summary, check_wx, check_user_bit, check_executable,
          check_global, check_kernel_pgd_nx, check_cea_fixed, check_kaslr_entry_text, check_kaslr_kernel_mapped,
          check_kaslr_off, check_anomalies)


def audit(views: Views) -> list[Finding]:
    """Run every check; findings sorted most severe first."""
    kinds = classify(views)
    findings = [f for check in CHECKS for f in check(views, kinds)]
    return sorted(findings, key=lambda f: -f.severity)
