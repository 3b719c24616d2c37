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


DIVERGENCE_KINDS = ("", "missing in user view", "only in user view", "rights differ", "frame differs")
ABSENT = 255  # no page: its rights print as "-"


def diff(user: Walk, kernel: Walk, start: int, end: int) -> list[Divergence]:
    """Where the user view of [start, end) differs from the kernel's, runs of pages
    (a run: consecutive pages with the same kind of divergence and the same rights)."""
    u, k = pages(user, start, end), pages(kernel, start, end)
    vas = np.union1d(u["va"], k["va"])
    in_u, u_at = _lookup(u, vas)
    in_k, k_at = _lookup(k, vas)
    code = np.zeros(len(vas), np.int8)  # index into DIVERGENCE_KINDS
    code[in_k & ~in_u] = 1
    code[in_u & ~in_k] = 2
    both = in_u & in_k
    ub, kb = u[u_at[both]], k[k_at[both]]
    code[both] = np.where(ub["eff"] != kb["eff"], 3, np.where(ub["pa"] != kb["pa"], 4, 0))
    shown = np.uint8(EFF_RW | EFF_NX)  # what rights() prints
    u_rights = np.where(in_u, u["eff"][u_at] & shown, ABSENT) if len(u) else np.full(len(vas), ABSENT)
    k_rights = np.where(in_k, k["eff"][k_at] & shown, ABSENT) if len(k) else np.full(len(vas), ABSENT)
    sel = np.flatnonzero(code)
    va, code, u_rights, k_rights = vas[sel], code[sel], u_rights[sel], k_rights[sel]
    new_run = np.ones(len(sel), dtype=bool)
    new_run[1:] = ((code[1:] != code[:-1]) | (u_rights[1:] != u_rights[:-1]) | (k_rights[1:] != k_rights[:-1])
                   | (va[1:] != va[:-1] + np.uint64(e.PAGE_SIZE)))
    starts = np.flatnonzero(new_run)
    lengths = np.diff(np.append(starts, len(sel)))
    return [Divergence(int(va[i]), int(n), DIVERGENCE_KINDS[code[i]], _shown(u_rights[i]), _shown(k_rights[i]))
            for i, n in zip(starts.tolist(), lengths.tolist())]


def _lookup(view: np.ndarray, vas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which of vas the view holds a page at, and where (clipped to the view for the others)."""
    if not len(view):
        return np.zeros(len(vas), bool), np.zeros(len(vas), np.intp)
    at = np.minimum(np.searchsorted(view["va"], vas), len(view) - 1)
    return view["va"][at] == vas, at


def _shown(eff: int) -> str:
    return "-" if eff == ABSENT else rights(int(eff))
