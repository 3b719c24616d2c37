"""Two views of the same addresses, page by page: what the user tables give
versus what the kernel's own tables give."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ptilab.paging import EFF_NX, EFF_RW, Walk
from ptilab.paging import entry as e

PAGE_DTYPE = np.dtype([("va", "<u8"), ("pa", "<u8"), ("eff", "u1"), ("glb", "?")])


def pages(walk: Walk, start: int, end: int) -> np.ndarray:
    """Every present 4 KiB page of the walk inside [start, end), vectorised."""
    # Inclusive last bytes: a range ending at the top of the address space
    # would overflow u64 with an exclusive end.
    last_wanted = np.uint64(min(end, 1 << 64) - 1)
    r = walk.ranges_within(start, end)  # expands only the aliases that reach the window
    r = r[(r["prot"] & np.uint64(e.P)) != 0]
    last = r["va"] + (r["size"] - np.uint64(1))
    r = r[(last >= np.uint64(start)) & (r["va"] <= last_wanted)]
    if not len(r):
        return np.zeros(0, PAGE_DTYPE)
    lo = np.maximum(r["va"], np.uint64(start))
    hi = np.minimum(r["va"] + (r["size"] - np.uint64(1)), last_wanted)
    counts = (((hi - lo) >> np.uint64(12)) + np.uint64(1)).astype(np.int64)
    owner = np.repeat(np.arange(len(r)), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    step = (np.arange(counts.sum()) - first).astype(np.uint64) << np.uint64(12)
    out = np.empty(len(owner), PAGE_DTYPE)
    out["va"] = lo[owner] + step
    out["pa"] = r["pa"][owner] + (lo[owner] - r["va"][owner]) + step
    out["eff"] = r["eff"][owner]
    out["glb"] = (r["prot"][owner] & np.uint64(e.G)) != 0
    return out


def rights(eff: int) -> str:
    return ("RW" if eff & EFF_RW else "ro") + (" NX" if eff & EFF_NX else " x")


@dataclass(frozen=True)
class Divergence:
    va: int
    pages: int
    kind: str  # "missing in user view", "only in user view", "rights differ", "frame differs"
    user: str
    kernel: str


def diff(user: Walk, kernel: Walk, start: int, end: int) -> list[Divergence]:
    """Where the user view of [start, end) differs from the kernel's, runs of pages."""
    u, k = pages(user, start, end), pages(kernel, start, end)
    vas = np.union1d(u["va"], k["va"])
    ui = np.searchsorted(u["va"], vas)
    ki = np.searchsorted(k["va"], vas)
    in_u = (ui < len(u)) & (u["va"][np.minimum(ui, len(u) - 1)] == vas) if len(u) else np.zeros(len(vas), bool)
    in_k = (ki < len(k)) & (k["va"][np.minimum(ki, len(k) - 1)] == vas) if len(k) else np.zeros(len(vas), bool)
    kinds = np.full(len(vas), "", dtype=object)
    kinds[in_k & ~in_u] = "missing in user view"
    kinds[in_u & ~in_k] = "only in user view"
    both = in_u & in_k
    ub, kb = u[ui[both]], k[ki[both]]
    sub = np.full(both.sum(), "", dtype=object)
    sub[ub["eff"] != kb["eff"]] = "rights differ"
    sub[(ub["pa"] != kb["pa"]) & (sub == "")] = "frame differs"
    kinds[both] = sub
    out: list[Divergence] = []
    for i in np.flatnonzero(kinds != ""):
        va = int(vas[i])
        ur = rights(int(u["eff"][ui[i]])) if in_u[i] else "-"
        kr = rights(int(k["eff"][ki[i]])) if in_k[i] else "-"
        last = out[-1] if out else None
        if last and last.kind == kinds[i] and last.va + last.pages * 4096 == va and (last.user, last.kernel) == (ur, kr):
            out[-1] = Divergence(last.va, last.pages + 1, last.kind, ur, kr)
        else:
            out.append(Divergence(va, 1, str(kinds[i]), ur, kr))
    return out
