"""Audit the running kernel: init_mm's PGD pair through /proc/kcore, a second
opinion from debugfs ptdump where the kernel has it, and the kernel's own
claims about PTI held against its tables.

init_mm's PGD is ``init_top_pgt`` (VMCOREINFO names it). Under PTI its user
twin 4 KiB above holds the kernel half every process's user PGD gets
(clone_pgd_range() copies both halves at pgd_alloc()): what a Meltdown
attacker in any process can reach.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptilab.audit.findings import Finding, Severity
from ptilab.audit.sources import ImageViews, views_from_image
from ptilab.errors import InputError
from ptilab.linux import exposure as ex
from ptilab.linux.live import Claims, open_kcore, read_claims
from ptilab.memory.kcore import Kcore
from ptilab.memory.vmcoreinfo import VmcoreInfo
from ptilab.paging import Geometry, Walk
from ptilab.paging import entry as e

CURRENT_USER = "sys/kernel/debug/page_tables/current_user"


@dataclass
class LiveKernel:
    """The running kernel as ptilab reads it."""

    root: Path
    kcore: Kcore
    info: VmcoreInfo
    claims: Claims

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.info.levels)

    def as_dict(self) -> dict:
        return {"root": str(self.root), "source": self.kcore.path, "release": self.info.osrelease,
                "init_top_pgt": f"{self.info.kernel_pgd:#x}", "levels": self.info.levels,
                "kernel_offset": f"{self.info.kernel_offset:#x}", "claims": self.claims.as_dict()}


def open_live(root: Path = Path("/")) -> LiveKernel:
    """/proc/kcore, its VMCOREINFO and the kernel's claims; InputError (one line, why) when unreadable."""
    kcore = open_kcore(root)
    try:
        info = kcore.vmcoreinfo
        assert info is not None, "open_kcore() refuses a kcore without its VMCOREINFO note"
        pgd = info.kernel_pgd
        if not kcore.frames_present(np.array([pgd >> e.PAGE_SHIFT], np.uint64))[0]:
            raise InputError(f"{kcore.path}: init_top_pgt at pa {pgd:#x} lies in no RAM segment (a kcore "
                             f"without physical addresses: Linux before 4.11)")
        if not kcore.read_frame(pgd >> e.PAGE_SHIFT)[256:].any():
            raise InputError(f"{kcore.path}: init_top_pgt at pa {pgd:#x} reads as zeros: the kernel hid "
                             f"the page (offline, or excluded from kcore)")
    except BaseException:
        kcore.close()
        raise
    return LiveKernel(root, kcore, info, read_claims(root))


def live_symbols(root: Path) -> dict[str, int] | None:
    """/proc/kallsyms when it shows addresses (root, kptr_restrict < 2), else None."""
    from ptilab.formats.kallsyms import read_symbols

    try:
        symbols = read_symbols(root / "proc/kallsyms")
    except InputError:
        return None
    return symbols if symbols.get("_text") else None


def live_views(live: LiveKernel, symbols: dict[str, int] | None, cr3: int | None = None) -> ImageViews:
    """The audit's views of init_mm's pair (or of the PGD at cr3)."""
    found = views_from_image(live.kcore, live.info.kernel_pgd if cr3 is None else cr3, live.geometry, symbols)
    # /proc/kallsyms gives running addresses, so the slide inferred from them is 0: the kernel's own word wins.
    found.kaslr_slide = live.info.kernel_offset
    return found


@dataclass
class LiveAudit:
    kernel: LiveKernel
    found: ImageViews
    findings: list[Finding]  # the image audit's, the claims', debugfs ptdump's; most severe first
    exposure: ex.Exposure


def claims_exposure(claims: Claims, kernel_offset: int | None, stated: ex.Meltdown | None = None) -> ex.Exposure:
    """What the running kernel says of its CPU and KASLR, strongest source first (ptilab.linux.exposure)."""
    readings = [r for r in [ex.from_sysfs(claims.meltdown or "")] if r is not None]
    readings += ex.from_cpuinfo(claims.cpu_bugs or "")
    log = [ex.PTI_LOG_PREFIX + line for line in claims.log or ()] + ([claims.cpu_line] if claims.cpu_line else [])
    readings += ex.from_log(log)
    return ex.exposure(readings, stated, claims.cmdline, kernel_offset)


def audit_live(kernel: LiveKernel, symbols: dict[str, int] | None, cr3: int | None = None,
               stated: ex.Meltdown | None = None) -> LiveAudit:
    """Audit the running kernel's tables and hold its claims (and debugfs ptdump) against them."""
    from dataclasses import replace

    from ptilab.audit.checks import audit

    found = live_views(kernel, symbols, cr3)
    exposure = claims_exposure(kernel.claims, kernel.info.kernel_offset, stated)
    findings = audit(replace(found.views, exposure=exposure))
    findings += check_claims(kernel.claims, is_isolated(found, findings))
    current_user = read_current_user(kernel.root)
    if current_user is not None:
        findings.append(compare_current_user(*current_user, found.user))
    return LiveAudit(kernel, found, sorted(findings, key=lambda f: -f.severity), exposure)


# -- the kernel's claims against its tables -----------------------------------------

def check_claims(claims: Claims, isolated: bool) -> list[Finding]:
    """Findings where what the kernel reports about PTI and what its tables do disagree.

    isolated: the user tables are a PTI pair's and map no more of the kernel than entry needs."""
    said = claims.says_pti()
    on = [f"{src} ({_quote(claims, src)})" for src, v in said.items() if v is True]
    off = [f"{src} ({_quote(claims, src)})" for src, v in said.items() if v is False]
    tables = "the user tables isolate the kernel" if isolated else "the user tables do not isolate the kernel"
    found = []
    if on and off:
        found.append(Finding("CLAIMS-DISAGREE", Severity.MEDIUM, "the kernel's reports about PTI contradict each other",
                             f"{', '.join(on)} say PTI is on; {', '.join(off)} say it is off. They read the same "
                             f"X86_FEATURE_PTI, so one of them is not this kernel's (a stale file, a "
                             f"filtered /proc) or the kernel changed it after boot; {tables}."))
    if on and not isolated:
        found.append(Finding("CLAIM-PTI-UNBACKED", Severity.CRITICAL, "the kernel reports PTI but its tables do not isolate",
                             f"{', '.join(on)} report page-table isolation, yet the tables used in user mode "
                             f"map the kernel (see PTI-OFF). Tools that read only flags would call this machine "
                             f"mitigated; Meltdown would read kernel memory."))
    if off and isolated:
        found.append(Finding("CLAIM-PTI-UNREPORTED", Severity.LOW, "the tables isolate but the kernel reports no PTI",
                             f"{', '.join(off)} report no page-table isolation, yet the user tables map only what "
                             f"entry needs. Flag-reading tools (spectre-meltdown-checker) would call this machine "
                             f"vulnerable; the tables say otherwise."))
    if claims.requested == "on" and not isolated:
        found.append(Finding("PTI-REQUEST-IGNORED", Severity.HIGH, "pti=on on the command line, but no isolation",
                             "The command line asks for PTI, yet the user tables map the kernel. A kernel built "
                             "without CONFIG_PAGE_TABLE_ISOLATION ignores pti=on without a word."))
    if not found:
        parts = [f"{src}: {_quote(claims, src)}" for src in said if _quote(claims, src) != "unread"]
        if claims.cmdline is not None:
            parts.append(f"command line asks {claims.requested}")
        found.append(Finding("CLAIMS-AGREE", Severity.INFO, "the kernel's reports agree with its tables",
                             f"{'; '.join(parts)}; {tables}."))
    return found


def _quote(claims: Claims, source: str) -> str:
    if source == "vulnerabilities/meltdown":
        return "unread" if claims.meltdown is None else repr(claims.meltdown)
    if source == "cpuinfo pti flag":
        return "unread" if claims.pti_flag is None else ("set" if claims.pti_flag else "absent")
    if claims.log is None:
        return "unread"
    return repr(claims.log[-1]) if claims.log else "no PTI message (the log may have wrapped)"


def is_isolated(found: ImageViews, findings: list[Finding]) -> bool:
    """A PTI pair whose user view the audit did not find wide open."""
    return found.pair.is_pti and not any(f.id == "PTI-OFF" for f in findings)


# -- debugfs ptdump, a second source ------------------------------------------------------

def compare_current_user(text: str, source: str, user: Walk) -> Finding:
    """Hold debugfs's current_user (the reading process's user PGD) against the
    walk of init_mm's user PGD. Their kernel halves are copies of one another
    (clone_pgd_range()); the user halves differ (ptilab's own process), so
    only present kernel-half lines are compared, as ptdump prints them."""
    from ptilab.formats.ptdump import format_walk, linux_markers, parse_ptdump

    g = user.geometry
    theirs = _kernel_lines(parse_ptdump(text, source, g).ranges, g)
    ours = _kernel_lines(parse_ptdump(format_walk(user, linux_markers(g)), "the walk", g).ranges, g)
    if len(theirs) == len(ours) and (theirs == ours).all():
        return Finding("PTDUMP-AGREES", Severity.INFO, "debugfs ptdump agrees with the walk",
                       f"{source} shows the same {len(ours)} present kernel-half lines as ptilab's walk of "
                       f"init_mm's user PGD through /proc/kcore.")
    n = min(len(theirs), len(ours))
    differ = np.flatnonzero(theirs[:n] != ours[:n])
    at = int(differ[0]) if len(differ) else n
    first = (f"line {at + 1}: kernel {_line(theirs, at)}, walk {_line(ours, at)}")
    return Finding("PTDUMP-DISAGREES", Severity.MEDIUM, "debugfs ptdump and the walk disagree",
                   f"{source} shows {len(theirs)} present kernel-half lines, ptilab's walk of init_mm's user PGD "
                   f"{len(ours)}; first difference at {first}. Both read the same tables: either they changed "
                   f"between the two reads, or one reader is wrong.")


def _kernel_lines(r: np.ndarray, g: Geometry) -> np.ndarray:
    keep = ((r["prot"] & np.uint64(e.P)) != 0) & (r["va"] >= np.uint64(g.kernel_half_start()))
    return np.array(list(zip(r["va"][keep].tolist(), r["size"][keep].tolist(), r["prot"][keep].tolist(),
                             r["level"][keep].tolist())), dtype=[("va", "<u8"), ("size", "<u8"), ("prot", "<u8"),
                                                                  ("level", "u1")])


def _line(lines: np.ndarray, at: int) -> str:
    if at >= len(lines):
        return "nothing"
    va, size = int(lines["va"][at]), int(lines["size"][at])
    return f"{va:#x}-{(va + size) & 0xFFFF_FFFF_FFFF_FFFF:#x} flags {int(lines['prot'][at]):#x}"


def read_current_user(root: Path) -> tuple[str, str] | None:
    """(text, path) of debugfs's current_user, or None where the kernel has no
    CONFIG_PTDUMP_DEBUGFS or debugfs is not mounted."""
    path = root / CURRENT_USER
    try:
        return path.read_text(errors="replace"), str(path)
    except OSError:
        return None
