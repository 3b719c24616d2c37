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
    r = _present(walk, start, end)
    counts = (((r["last"] - r["first"]) >> np.uint64(12)) + np.uint64(1)).astype(np.int64)
    owner = np.repeat(np.arange(len(r)), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    step = (np.arange(counts.sum()) - first).astype(np.uint64) << np.uint64(12)
    out = np.empty(len(owner), PAGE_DTYPE)
    out["va"] = r["first"][owner] + step
    out["pa"] = r["pa"][owner] + step
    out["eff"] = r["eff"][owner]
    out["glb"] = r["glb"][owner]
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
    (a run: consecutive pages with the same kind of divergence and the same rights).

    Judged per interval between the two views' range edges, not per page: in
    such an interval each view is one leaf range or none, so every page of it
    diverges alike (a frame differs everywhere or nowhere)."""
    u, k = _present(user, start, end), _present(kernel, start, end)
    if np.array_equal(u, k):
        return []
    # Four sorted runs: a stable (merging) sort is near linear on them.
    first = np.sort(np.concatenate((u["first"], u["last"] + np.uint64(1), k["first"], k["last"] + np.uint64(1))),
                    kind="stable")
    first = first[np.append(True, first[1:] != first[:-1]) & (first >= np.uint64(start)) & (first <= _last_byte(end))]
    last = np.append(first[1:] - np.uint64(1), _last_byte(end))
    in_u, u_at = _covering(u, first)
    in_k, k_at = _covering(k, first)
    code = np.zeros(len(first), np.int8)  # index into DIVERGENCE_KINDS
    code[in_k & ~in_u] = 1
    code[in_u & ~in_k] = 2
    both = in_u & in_k
    ub, kb = u[u_at[both]], k[k_at[both]]
    frame_differs = ub["pa"] - ub["first"] != kb["pa"] - kb["first"]  # each view's pa - va offset (mod 2^64)
    code[both] = np.where(ub["eff"] != kb["eff"], 3, np.where(frame_differs, 4, 0))
    shown = np.uint8(EFF_RW | EFF_NX)  # what rights() prints
    u_rights = np.where(in_u, u["eff"][u_at] & shown, ABSENT) if len(u) else np.full(len(first), ABSENT)
    k_rights = np.where(in_k, k["eff"][k_at] & shown, ABSENT) if len(k) else np.full(len(first), ABSENT)
    sel = np.flatnonzero(code)
    first, last, code, u_rights, k_rights = first[sel], last[sel], code[sel], u_rights[sel], k_rights[sel]
    new_run = np.ones(len(sel), dtype=bool)
    new_run[1:] = ((code[1:] != code[:-1]) | (u_rights[1:] != u_rights[:-1]) | (k_rights[1:] != k_rights[:-1])
                   | (first[1:] != last[:-1] + np.uint64(1)))
    starts = np.flatnonzero(new_run)
    ends = np.append(starts, len(sel))[1:] - 1
    pages = ((last[ends] - first[starts]) >> np.uint64(e.PAGE_SHIFT)) + np.uint64(1)
    return [Divergence(va, n, DIVERGENCE_KINDS[kind], _SHOWN[ur], _SHOWN[kr]) for va, n, kind, ur, kr in
            zip(first[starts].tolist(), pages.tolist(), code[starts].tolist(), u_rights[starts].tolist(),
                k_rights[starts].tolist())]


_PRESENT_DTYPE = np.dtype([("first", "<u8"), ("last", "<u8"), ("pa", "<u8"), ("eff", "u1"), ("glb", "?")])


def _present(walk: Walk, start: int, end: int) -> np.ndarray:
    """The walk's present leaf ranges clipped to [start, end): first and last
    byte (inclusive: a range ending at the top of the address space would
    overflow u64 with an exclusive end), the frame at first."""
    last_wanted = _last_byte(end)
    r = walk.ranges_within(start, end)  # expands only the aliases that reach the window
    r = r[(r["prot"] & np.uint64(e.P)) != 0]
    last = r["va"] + (r["size"] - np.uint64(1))
    r, last = (x[(last >= np.uint64(start)) & (r["va"] <= last_wanted)] for x in (r, last))
    out = np.empty(len(r), _PRESENT_DTYPE)
    out["first"] = np.maximum(r["va"], np.uint64(start))
    out["last"] = np.minimum(last, last_wanted)
    out["pa"] = r["pa"] + (out["first"] - r["va"])
    out["eff"] = r["eff"]
    out["glb"] = (r["prot"] & np.uint64(e.G)) != 0
    return out


def _last_byte(end: int) -> np.uint64:
    return np.uint64(min(end, 1 << 64) - 1)


def _covering(view: np.ndarray, first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which intervals (by their first byte) a range of the view covers, and which range."""
    if not len(view):
        return np.zeros(len(first), bool), np.zeros(len(first), np.intp)
    at = np.maximum(np.searchsorted(view["first"], first, side="right") - 1, 0)
    return (view["first"][at] <= first) & (view["last"][at] >= first), at


_SHOWN = [rights(eff) for eff in range(ABSENT)] + ["-"]  # how each diff's rights code prints
