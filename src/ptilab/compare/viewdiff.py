"""ptilab diff: what the user tables of one kernel (B) expose that another's (A) do not.

Both views are labelled by ptilab.linux.regions.label_ranges(), the names
the audit uses, and judged region by region:

- where both map the same address, a right B adds (writable, executable,
  user, global) is a widening;
- what B maps at an address A leaves unmapped is new, unless A maps as
  many pages of that region with the same rights elsewhere: then the
  region moved (a KASLR slide of the kernel image, page_offset_base
  moving the cpu_tss_rw pages, the cpu_entry_area's random slots since
  6.2), which exposes nothing more;
- what A maps and B no longer does, at its address or moved, is gone.

Only the kernel half counts: the user half is the process's own memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ptilab.linux.profiles import LINUX_6_1, Profile
from ptilab.linux.regions import label_ranges
from ptilab.paging import EFF_NX, EFF_RW, EFF_US, Geometry, split_at
from ptilab.paging import entry as e

# A range's rights as bits, each one a right B may widen.
W, X, U, G = 1, 2, 4, 8
POSITION_FREE = ("espfix",)
RIGHT_NAMES = ((U, "user"), (W, "writable"), (X, "executable"), (G, "global"))


@dataclass
class Side:
    """One view to diff: the user tables' ranges as an audit reads them."""

    name: str
    geometry: Geometry
    user: np.ndarray  # RANGE_DTYPE
    copies: np.ndarray | None = None  # per range, how many times it appears (Views.user_copies)
    symbols: dict[str, int] = field(default_factory=dict)
    profile: Profile = LINUX_6_1


@dataclass(frozen=True)
class Change:
    kind: str  # "new", "widened", "moved", "gone", "narrowed"
    region: str
    va: int  # the first address (B's; A's for "gone")
    pages: int
    rights: str  # B's rights (A's for "gone")
    was: str = ""  # A's rights, for "widened" and "narrowed"
    shift: int | None = None  # "moved": B's address minus A's, when the whole region slid by one amount
    ranges: int = 1  # address runs summed up in this change

    def as_dict(self) -> dict:
        d = {"kind": self.kind, "region": self.region, "va": f"{self.va:#x}", "pages": self.pages,
             "ranges": self.ranges, "rights": self.rights}
        if self.was:
            d["was"] = self.was
        if self.kind == "moved":
            d["shift"] = None if self.shift is None else _signed_hex(self.shift)
        return d


@dataclass
class ViewDiff:
    a: str
    b: str
    levels: tuple[int, int]
    exposed: list[Change]  # new and widened: what B exposes more than A
    moved: list[Change]
    gone: list[Change]  # gone and narrowed
    notes: list[str]

    @property
    def exposes_more(self) -> bool:
        return bool(self.exposed)

    def as_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "paging": list(self.levels), "exposes_more": self.exposes_more,
                "exposed": [c.as_dict() for c in self.exposed], "moved": [c.as_dict() for c in self.moved],
                "gone": [c.as_dict() for c in self.gone], "notes": self.notes}


_PIECE = np.dtype([("va", "<u8"), ("size", "<u8"), ("rights", "u1"), ("copies", "<i8"), ("label", "<i4")])


def rights_text(bits: int) -> str:
    """ptdump-like words: 'USR RW x GLB'."""
    words = (["USR"] if bits & U else []) + ["RW" if bits & W else "ro", "x" if bits & X else "NX"]
    return " ".join(words + (["GLB"] if bits & G else []))


def diff_views(a: Side, b: Side) -> ViewDiff:
    """What B's user tables map of the kernel that A's do not, what moved, what is gone."""
    labels: list[str] = []
    pa, pb = _pieces(a, labels), _pieces(b, labels)
    pa, pb = _cut_alike(pa, pb)
    # ESPfix maps a few pages 65536 times, and a view summarises them its own way (a walk's
    # distinct records, ptdump's skipped lines): only their totals compare.
    free = [labels.index(name) for name in POSITION_FREE if name in labels]
    free_a, free_b = np.isin(pa["label"], free), np.isin(pb["label"], free)
    common, ia, ib = np.intersect1d(pa["va"][~free_a], pb["va"][~free_b], assume_unique=True, return_indices=True)
    ia, ib = np.flatnonzero(~free_a)[ia], np.flatnonzero(~free_b)[ib]
    only_a = np.ones(len(pa), bool)
    only_a[ia] = False
    only_b = np.ones(len(pb), bool)
    only_b[ib] = False
    exposed, gone, moved = [], [], []
    both_a, both_b = pa[ia], pb[ib]
    wider = (both_b["rights"] & ~both_a["rights"]) != 0
    narrower = (both_a["rights"] & ~both_b["rights"]) != 0
    exposed += _runs("widened", both_b[wider], labels, was=both_a[wider])
    gone += _runs("narrowed", both_b[narrower], labels, was=both_a[narrower])
    new, lost = pb[only_b], pa[only_a]
    for label in sorted(set(new["label"].tolist()) | set(lost["label"].tolist())):
        n, g = new[new["label"] == label], lost[lost["label"] == label]
        for bits in sorted(set(n["rights"].tolist()) | set(g["rights"].tolist())):
            added, went = _regrouped(n[n["rights"] == bits], g[g["rights"] == bits], labels[label])
            exposed += added
            moved += [c for c in went if c.kind == "moved"]
            gone += [c for c in went if c.kind != "moved"]
    return ViewDiff(a.name, b.name, (a.geometry.levels, b.geometry.levels), _summed(exposed), _summed(moved),
                    _summed(gone), _notes(a, b))


def _summed(changes: list[Change]) -> list[Change]:
    """One change per kind, region and rights: its first address, pages and runs summed."""
    groups: dict[tuple, Change] = {}
    for c in sorted(changes, key=lambda c: c.va):
        key = (c.kind, c.region, c.rights, c.was)
        seen = groups.get(key)
        groups[key] = c if seen is None else replace(seen, pages=seen.pages + c.pages,
                                                      ranges=seen.ranges + c.ranges)
    return sorted(groups.values(), key=lambda c: (c.region, c.va))


def _pieces(side: Side, labels: list[str]) -> np.ndarray:
    """The side's labelled kernel-half ranges, rights as bits; labels grows with new names."""
    r, copies, names = label_ranges(side.user, side.copies, side.geometry, side.symbols, side.profile)
    out = np.empty(len(r), _PIECE)
    out["va"], out["size"], out["copies"] = r["va"], r["size"], copies
    eff = r["eff"]
    out["rights"] = ((((eff & EFF_RW) != 0) * W) | (((eff & EFF_NX) == 0) * X) | (((eff & EFF_US) != 0) * U)
                     | (((r["prot"] & np.uint64(e.G)) != 0) * G)).astype(np.uint8)
    index = {name: i for i, name in enumerate(labels)}
    for name in dict.fromkeys(names.tolist()):
        if name not in index:
            index[name] = len(labels)
            labels.append(name)
    out["label"] = [index[name] for name in names.tolist()]
    return out[np.argsort(out["va"], kind="stable")]


def _cut_alike(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both sides cut at every edge of either, so that a piece of A and one
    of B starting at the same address also end at the same one."""
    cuts = np.unique(np.concatenate([a["va"], a["va"] + a["size"], b["va"], b["va"] + b["size"]]))
    return tuple(_split(p, cuts) for p in (a, b))


def _split(p: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    r = np.zeros(len(p), dtype=[("va", "<u8"), ("size", "<u8"), ("pa", "<u8"), ("prot", "<u8")])
    r["va"], r["size"] = p["va"], p["size"]  # prot 0: split_at leaves pa alone
    pieces, origin = split_at(r, cuts)
    out = p[origin]
    out["va"], out["size"] = pieces["va"], pieces["size"]
    return out


def _regrouped(new: np.ndarray, lost: np.ndarray, region: str) -> tuple[list[Change], list[Change]]:
    """One region's pages of one set of rights that B maps where A does not
    (new) and A maps where B does not (lost): as many as both have moved;
    only B's surplus is new, only A's is gone. (The changes B exposes, the
    moves and the gone ones.)"""
    labels = [region]
    new, lost = new.copy(), lost.copy()
    new["label"] = lost["label"] = 0
    if not len(lost):
        return _runs("new", new, labels), []
    if not len(new):
        return [], _runs("gone", lost, labels)
    n, g = _pages(new), _pages(lost)
    if n == g and new["va"][0] == lost["va"][0]:
        return [], []  # a position-free region, the same in both
    move = _move(new, lost, region, min(n, g))
    # The surplus is among these runs, but which of their pages is not a question with an answer.
    if n > g:
        runs = _runs("new", new, labels)
        return [replace(runs[0], pages=n - g, ranges=len(runs))], [move]
    if g > n:
        runs = _runs("gone", lost, labels)
        return [], [move, replace(runs[0], pages=g - n, ranges=len(runs))]
    return [], [move]


def _pages(p: np.ndarray) -> int:
    return int((p["size"].astype(object) * p["copies"]).sum()) // e.PAGE_SIZE


def _move(new: np.ndarray, lost: np.ndarray, region: str, pages: int) -> Change:
    """A region's move: by one shift when every piece slid alike (KASLR),
    else None (random slots rearrange the pieces, or the counts differ)."""
    shift = (int(new["va"][0]) - int(lost["va"][0])) % (1 << 64)
    same_shape = (len(new) == len(lost) and np.array_equal(new["size"], lost["size"])
                  and np.array_equal(new["copies"], lost["copies"])
                  and bool(((new["va"] - lost["va"]) == np.uint64(shift)).all()))
    shift = shift - (1 << 64) if shift >= 1 << 63 else shift
    return Change("moved", region, int(new["va"][0]), pages, rights_text(int(new["rights"][0])),
                  shift=shift if same_shape else None, ranges=len(_runs("moved", new, [region])))


def _runs(kind: str, p: np.ndarray, labels: list[str], was: np.ndarray | None = None) -> list[Change]:
    """Address-adjacent pieces of one region and the same rights (and former rights) as one change each."""
    if not len(p):
        return []
    before = p["rights"] if was is None else was["rights"]
    joins = ((p["va"][1:] == p["va"][:-1] + p["size"][:-1]) & (p["label"][1:] == p["label"][:-1])
             & (p["rights"][1:] == p["rights"][:-1]) & (before[1:] == before[:-1]))
    starts = np.flatnonzero(np.append(True, ~joins))
    ends = np.append(starts[1:], len(p))
    weighed = p["size"].astype(object) * p["copies"]
    out = []
    for s, t in zip(starts.tolist(), ends.tolist()):
        pages = int(weighed[s:t].sum()) // e.PAGE_SIZE
        out.append(Change(kind, labels[int(p["label"][s])], int(p["va"][s]), pages, rights_text(int(p["rights"][s])),
                          was=rights_text(int(before[s])) if was is not None else ""))
    return out


def _notes(a: Side, b: Side) -> list[str]:
    if a.geometry.levels == b.geometry.levels:
        return []
    return [f"A is {a.geometry.levels}-level and B {b.geometry.levels}-level: the direct map, vmalloc and vmemmap "
            f"sit at other addresses, so those regions compare by what they map, not where"]


def widened_rights(was: str, now: str) -> str:
    """The rights a widening adds, in words ('writable, executable')."""
    bits = {word: bit for bit, word in ((U, "USR"), (W, "RW"), (X, "x"), (G, "GLB"))}
    old, new = set(was.split()), set(now.split())
    return ", ".join(name for bit, name in RIGHT_NAMES
                     for word, b in bits.items() if b == bit and word in new - old)


def _signed_hex(n: int) -> str:
    return f"-{-n:#x}" if n < 0 else f"+{n:#x}"
