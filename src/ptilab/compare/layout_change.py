"""Change the kernel's layout under a design and see whether it stays correct.

The seed's worry about design 1: its permissions are constants, so a kernel
that grows a piece, changes a right or adds guard pages silently diverges.
A design is correct under a layout if its user view of the cpu_entry_area
equals the kernel's page for page, and it boots without allocator bugs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ptilab.compare.metrics import measure
from ptilab.errors import PtilabError
from ptilab.linux.kernel import Kernel
from ptilab.linux.profiles import Piece, Profile, get_profile
from ptilab.pti import DESIGNS, get_design


def _new_piece(p: Profile) -> Profile:
    """A new per-CPU page the entry code needs (as the entry stack page was in 4.15)."""
    extra = Piece("new_entry_page", "new_piece", p.stride, 1, "RW", "new_entry_page")
    return replace(p, per_cpu=p.per_cpu + (extra,), stride=p.stride + 0x1000)


def _flip_tss(p: Profile) -> Profile:
    """The TSS changes rights (4.15 made it read-only once the trampoline stack left it)."""
    flip = {"RO": "RW", "RW": "RO"}
    return replace(p, per_cpu=tuple(replace(x, rights=flip[x.rights]) if x.kind == "tss" else x for x in p.per_cpu))


def _guard_pages(p: Profile) -> Profile:
    """An unmapped guard page below every exception stack (as 5.x added)."""
    pieces, shift = [], 0
    for x in p.per_cpu:
        if x.kind == "exception_stack":
            shift += 0x1000
        pieces.append(replace(x, offset=x.offset + shift))
    return replace(p, per_cpu=tuple(pieces), stride=p.stride + shift)


CHANGES = {
    "as-is": lambda p: p,
    "new-piece": _new_piece,
    "tss-rights": _flip_tss,
    "guard-pages": _guard_pages,
}


@dataclass(frozen=True)
class Outcome:
    change: str
    design: str
    correct: bool
    detail: str


def run(profile: str = "linux-6.1", cpus: int = 2, levels: int = 4, kaslr: bool = True,
        seed: int = 0) -> list[Outcome]:
    """Every change under every design; kaslr and seed place a linux-6.12 kernel's CPU areas."""
    base = get_profile(profile)
    # A bad NR_CPUS or paging mode is the caller's error, not a design failing under a change.
    Kernel(base, get_design("linux"), cpus, levels, kaslr, seed)
    outcomes = []
    for change, edit in CHANGES.items():
        layout = edit(base)
        for name in DESIGNS:
            try:
                kernel = Kernel(layout, get_design(name), cpus, levels, kaslr, seed).boot()
                report = measure(kernel)
            except PtilabError as err:
                outcomes.append(Outcome(change, name, False, f"fails: {err}"))
                continue
            problems = [f"{d.kind} at {d.va:#x} ({d.pages} page{'s' * (d.pages > 1)}: user {d.user}, kernel {d.kernel})"
                        for d in report.cea_divergences] + report.violations
            detail = "user view equals the kernel's" if not problems else (
                f"{len(problems)} divergence(s); first: {problems[0]}")
            outcomes.append(Outcome(change, name, not problems, detail))
    return outcomes
