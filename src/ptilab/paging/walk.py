"""The whole tree at once: a vectorised walk that turns page tables into ranges.

Each level is one numpy pass over the rows (table references) of that level;
each distinct table frame is read once per level however often it is
referenced. The result lists every leaf mapping and every non-present entry
the tables hold, coalesced into runs the way Linux's ptdump coalesces them,
but never across a physical discontinuity, so a range is exact: its pages map
pa, pa + 4K, ... with the same entry flags and effective rights.

Aliased subtrees are summarised, not expanded: when several rows reach the
same table with the same rights above it, only the lowest one (the source) is
walked; every other one becomes an alias record (ALIAS_DTYPE) saying "the
table's reach at va repeats the reach at source". So the walk costs what the
distinct tables cost: the ESPfix area of 8192 CPUs (65536 aliases of each of
128 pages) is a few thousand records, not 8 million. Walk.distinct holds the
walked records and Walk.aliases the alias records; Walk.ranges expands them,
lazily and within the max_entries budget, into exactly the list a full walk
gives. Consumers that must scale count with Walk.multiplicity() or expand
only a window (Walk.ranges_within()) or only as ptdump sees the tables
(Walk.runs(), ignoring physical addresses).

A second shortcut keeps direct maps cheap: a table of 512 leaves mapping one
contiguous physical range with the same flags becomes one run per reference.

Weights keep the full tree's counts: each walked row stands for as many rows
of the fully expanded tree as it summarises, so table_refs and the anomaly
counts are those of the expanded tree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from dataclasses import dataclass, field

import numpy as np

from ptilab.errors import FrameOutsideMemory, WalkTooLarge
from ptilab.paging import entry as e
from ptilab.paging.cr3 import CR3
from ptilab.paging.geometry import Geometry

if TYPE_CHECKING:
    from ptilab.memory.physical import PhysicalMemory

RANGE_DTYPE = np.dtype([
    ("va", "<u8"),     # canonical virtual start
    ("size", "<u8"),   # bytes
    ("pa", "<u8"),     # physical start (0 for a non-present run)
    ("level", "u1"),   # depth of the entry in the tree (0 = pgd)
    ("prot", "<u8"),   # the entry's own flags (entry & PTE_FLAGS_MASK), as ptdump keeps them
    ("eff", "u1"),     # effective rights along the walk: EFF_RW | EFF_US | EFF_NX
])
ALIAS_DTYPE = np.dtype([
    ("va", "<u8"),      # canonical start of the aliasing entry's reach
    ("size", "<u8"),    # the reach of the table it points at, bytes
    ("source", "<u8"),  # canonical start of the walked entry whose reach this one repeats
    ("level", "u1"),    # depth of the aliasing entry (0 = pgd); the shared table is one level below
])
EFF_RW = 1
EFF_US = 2
EFF_NX = 4
# Which half of the top-level table a table is reached through (both for the root).
HALF_USER = 1
HALF_KERNEL = 2

# Rows of 512 entries expanded at once: bounds the walk's working memory.
BATCH_ROWS = 4096
DEFAULT_MAX_ENTRIES = 1 << 27
# Records an expansion may hold: ~34 bytes each, twice while merging, so about 1.1 GB at most.
DEFAULT_MAX_RECORDS = 1 << 24


@dataclass(frozen=True)
class Anomaly:
    """Something in the tables no sane kernel writes; the walk went on around it."""

    kind: str  # 'table-outside-memory', 'reserved-bits', 'table-at-several-levels'
    level: str
    frames: tuple[int, ...]
    count: int
    detail: str


@dataclass
class Walk:
    """A walked address space: the distinct records and the aliases that
    repeat them, and what the walk saw on the way.

    ranges (the full address space in address order) is expanded from
    distinct and aliases on first use; mapped_bytes(), table_pages(),
    multiplicity() and alias_count() never expand."""

    geometry: Geometry
    cr3: CR3
    distinct: np.ndarray  # RANGE_DTYPE, sorted by va: the walked records, each aliased subtree once
    aliases: np.ndarray  # ALIAS_DTYPE, sorted by va: reaches that repeat a walked one
    tables: list[np.ndarray]  # per depth: distinct table frame numbers visited
    table_refs: list[np.ndarray]  # per depth: how many entries of the expanded tree referenced each of them
    anomalies: list[Anomaly] = field(default_factory=list)
    max_entries: int = DEFAULT_MAX_RECORDS  # records ranges may expand to before WalkTooLarge
    table_halves: list[np.ndarray] = field(default_factory=list)  # per depth, per table: HALF_USER | HALF_KERNEL
    _ranges: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def ranges(self) -> np.ndarray:
        """Every record of the address space (RANGE_DTYPE, sorted by va), aliases
        expanded: exactly what walking every alias gives. Computed once, on
        first use; WalkTooLarge past max_entries records."""
        if self._ranges is None:
            self._ranges = self.ranges_within(0, 1 << 64) if len(self.aliases) else self.distinct
        return self._ranges

    @property
    def mapped(self) -> np.ndarray:
        return self.ranges[(self.ranges["prot"] & e.P) != 0]

    def table_pages(self) -> int:
        return int(sum(len(t) for t in self.tables))

    def all_table_frames(self) -> np.ndarray:
        return sorted_unique(np.concatenate(self.tables)) if self.tables else np.zeros(0, np.uint64)

    def kernel_half_table_frames(self) -> np.ndarray:
        """The table frames reached through top-level slots 256-511 (the root
        included): what a walk with top_slots=(256, 512) visits."""
        parts = [t[(h & HALF_KERNEL) != 0] for t, h in zip(self.tables, self.table_halves)]
        return sorted_unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)

    def alias_count(self) -> int:
        """How many reaches repeat another one instead of being walked."""
        return len(self.aliases)

    def multiplicity(self, edges: Sequence[int] = ()) -> np.ndarray:
        """How many times each distinct record appears in the full address space.

        Without edges: an int64 array parallel to distinct. With sorted
        canonical addresses edges: shape (len(distinct), len(edges) + 1),
        column i counting the copies that start in [edges[i-1], edges[i]).
        An alias whose reach straddles an edge is counted by expanding."""
        bins = np.asarray(edges, dtype=np.uint64)
        a = self.aliases
        n, width = len(self.distinct), len(bins) + 1
        count = np.zeros((n, width), dtype=np.int64)
        count[np.arange(n), np.searchsorted(bins, self.distinct["va"], side="right")] = 1
        if not len(a):
            return count if len(bins) else count[:, 0]
        a_bin = np.searchsorted(bins, a["va"], side="right")
        if (a_bin != np.searchsorted(bins, a["va"] + (a["size"] - np.uint64(1)), side="right")).any():
            return self._multiplicity_by_expanding(bins)
        # Where each alias's own reach occurs, by bin: once where it is, plus
        # once per occurrence of every shallower alias whose source reach
        # holds it. Shallow first, so an alias's count is final before the
        # reaches it repeats pass it on to what lies inside them.
        seen = np.zeros((len(a), width), dtype=np.int64)
        seen[np.arange(len(a)), a_bin] = 1
        a_va, a_src = self._raw(a["va"]), self._raw(a["source"])
        r_va = self._raw(self.distinct["va"])
        for level in sorted_unique(a["level"]):
            at = np.flatnonzero(a["level"] == level)
            sources, of_alias = sorted_unique(a_src[at], inverse=True)
            repeats = np.zeros((len(sources), width), dtype=np.int64)
            np.add.at(repeats, of_alias, seen[at])
            reach = a["size"][at[0]]
            deeper = np.flatnonzero(a["level"] > level)
            inside, window = _holder(sources, reach, a_va[deeper])
            seen[deeper[inside]] += repeats[window[inside]]
            inside, window = _holder(sources, reach, r_va)
            count[inside] += repeats[window[inside]]
        return count if len(bins) else count[:, 0]

    def _multiplicity_by_expanding(self, bins: np.ndarray) -> np.ndarray:
        records, origin = self._expand(0, 1 << 64, by_pa=None)
        count = np.zeros((len(self.distinct), len(bins) + 1), dtype=np.int64)
        np.add.at(count, (origin, np.searchsorted(bins, self._canonical(records["va"]), side="right")), 1)
        return count if len(bins) else count[:, 0]

    def expanded_records(self) -> int:
        """How many records expanding every alias gives before coalescing (at least len(ranges))."""
        return int(self.multiplicity().sum())

    def mapped_bytes(self) -> int:
        present = (self.distinct["prot"] & np.uint64(e.P)) != 0
        return int((self.distinct["size"][present].astype(np.int64) * self.multiplicity()[present]).sum())

    def ranges_within(self, start: int, end: int) -> np.ndarray:
        """The records of the full address space that meet [start, end)
        (canonical addresses), expanding only the aliases that reach there.
        A run is coalesced as far as the expanded part reaches, so one that
        crosses start or end may be shorter than in ranges."""
        records, _ = self._expand(start, end, by_pa=True)
        return records

    def runs(self) -> np.ndarray:
        """The full address space coalesced as ptdump sees it: adjacent
        records with the same level, flags and rights joined whatever their
        frames (pa is then the first frame of a run). Expands aliases run by
        run, so repeated identical tables (the ESPfix area) stay small."""
        records, _ = self._expand(0, 1 << 64, by_pa=False)
        return records

    def _raw(self, va: np.ndarray) -> np.ndarray:
        return va & np.uint64((1 << self.geometry.va_bits) - 1)

    def _canonical(self, va: np.ndarray) -> np.ndarray:
        return _canonical(va, self.geometry)

    def _expand(self, start: int, end: int, by_pa: bool | None) -> tuple[np.ndarray, np.ndarray | None]:
        """Copy each alias's source reach to it, deepest aliases first, then
        coalesce (by_pa None: never coalesce, and say which distinct record
        each copy is). Only aliases reaching [start, end) are expanded."""
        u64 = np.uint64
        if end <= start:
            return np.zeros(0, RANGE_DTYPE), (np.zeros(0, np.intp) if by_pa is None else None)
        records = self.distinct.copy()
        records["va"] = self._raw(records["va"])
        origin = np.arange(len(records)) if by_pa is None else None
        a = self.aliases
        half = _hole(self.geometry)
        # The walk's own (raw) addresses: sign extension would break the order at the top of the user half.
        lo = int(self._raw(np.array([start], u64))[0])
        hi = 1 << self.geometry.va_bits if end >= 1 << 64 else int(self._raw(np.array([end - 1], u64))[0]) + 1
        a_src = self._raw(a["source"])
        need = self._aliases_reaching(lo, hi)
        if by_pa is False:
            records = _coalesce_within(records, _edges(a_src[need], a["size"][need], half), by_pa=False)
        for level in sorted_unique(a["level"][need])[::-1]:
            at = need & (a["level"] == level)
            records, origin = self._copy_reaches(records, origin, a_src[at], self._raw(a["va"][at]), a["size"][at])
            if origin is None:
                # Keep the source reaches still to copy whole: coalesce up to their edges only.
                later = need & (a["level"] < level)
                records = _coalesce_within(records, _edges(a_src[later], a["size"][later], half), by_pa=by_pa)
        if by_pa is not None:
            records = _coalesce_within(records, half, by_pa=by_pa)
        whole = (lo, hi) == (0, 1 << self.geometry.va_bits)
        keep = slice(None) if whole else (records["va"] + records["size"] > u64(lo)) & (records["va"] < u64(hi))
        records = records[keep]
        records["va"] = self._canonical(records["va"])
        return records, (origin[keep] if origin is not None else None)

    def _aliases_reaching(self, lo: int, hi: int) -> np.ndarray:
        """Which aliases an expansion of raw [lo, hi) needs: those reaching the
        window or the source reach of a needed shallower alias (shallow first)."""
        a = self.aliases
        a_va, a_src = self._raw(a["va"]), self._raw(a["source"])
        need = np.zeros(len(a), dtype=bool)
        want_lo, want_hi = np.array([lo], np.uint64), np.array([hi], np.uint64)
        for level in sorted_unique(a["level"]):
            hit = (a["level"] == level) & _overlaps(a_va, a_va + a["size"], want_lo, want_hi)
            need |= hit
            want_lo = np.concatenate((want_lo, a_src[hit]))
            want_hi = np.concatenate((want_hi, a_src[hit] + a["size"][hit]))
        return need

    def _copy_reaches(self, records: np.ndarray, origin: np.ndarray | None, src: np.ndarray, dst: np.ndarray,
                      size: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Records with the records of each reach [src, src + size) copied to dst (raw addresses)."""
        first = np.searchsorted(records["va"], src)
        n = np.searchsorted(records["va"], src + size) - first
        if len(records) + int(n.sum()) > self.max_entries:
            raise WalkTooLarge(
                f"the tables repeat {len(self.aliases)} shared tables' reaches into over {self.max_entries} "
                f"ranges, beyond any real kernel (from Python, Walk.multiplicity() counts them and "
                f"Walk.runs() lists them as ptdump would)")
        ends = np.cumsum(n)
        idx = np.repeat(first - (ends - n), n) + np.arange(int(ends[-1]) if len(ends) else 0)
        copies = _whole(records)[idx].view(RANGE_DTYPE)
        copies["va"] = copies["va"] - np.repeat(src, n) + np.repeat(dst, n)
        # The aliases' reaches are empty in records and copies come in
        # address order: merge by position instead of sorting it all again.
        into = np.searchsorted(records["va"], copies["va"]) + np.arange(len(copies))
        held = np.ones(len(records) + len(copies), dtype=bool)
        held[into] = False
        merged = np.empty(len(held), RANGE_DTYPE)
        _whole(merged)[into] = _whole(copies)
        _whole(merged)[held] = _whole(records)
        if origin is not None:
            moved = np.empty(len(held), np.intp)
            moved[into] = origin[idx]
            moved[held] = origin
            origin = moved
        return merged, origin


def split_at(r: np.ndarray, cuts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split ranges at the sorted addresses cuts that fall strictly inside
    them: (the pieces, in order, and for each the index of its range in r).
    A present piece keeps its frames (pa moves with va)."""
    u64 = np.uint64
    cuts = np.asarray(cuts, dtype=u64)
    if not len(cuts) or not len(r):
        return r, np.arange(len(r))
    last = r["va"] + (r["size"] - u64(1))  # the last byte: the top range's end wraps to 0
    first_cut = np.searchsorted(cuts, r["va"], side="right")
    n = 1 + np.searchsorted(cuts, last, side="right") - first_cut
    origin = np.repeat(np.arange(len(r)), n)
    k = np.arange(len(origin)) - np.repeat(np.cumsum(n) - n, n)  # piece number within its range
    at = first_cut[origin] + k
    start = np.where(k == 0, r["va"][origin], cuts[np.clip(at - 1, 0, len(cuts) - 1)])
    end = np.where(k == n[origin] - 1, r["va"][origin] + r["size"][origin], cuts[np.clip(at, 0, len(cuts) - 1)])
    out = r[origin]
    out["va"], out["size"] = start, end - start
    present = (out["prot"] & u64(e.P)) != 0
    out["pa"] = np.where(present, out["pa"] + (start - r["va"][origin]), out["pa"])
    return out, origin


def _hole(geometry: Geometry) -> np.ndarray:
    """Where the two halves touch in raw addresses (the non-canonical hole):
    a barrier no record may be coalesced across."""
    return np.array([1 << (geometry.va_bits - 1)], np.uint64)


def coalesce(r: np.ndarray, by_pa: bool = True) -> np.ndarray:
    """Join address-adjacent runs with the same level, flags and rights (and,
    with by_pa, physically contiguous frames). r must be sorted by va."""
    return _coalesce_within(r, None, by_pa)


def _coalesce_within(r: np.ndarray, barriers: np.ndarray | None, by_pa: bool = True) -> np.ndarray:
    """coalesce(), but never joining at an address in barriers (sorted): a
    source reach stays a self-contained slice that aliases can copy.
    r must be sorted by va."""
    if len(r) <= 1:
        return r
    va, size, prot = r["va"], r["size"], r["prot"]
    join = va[1:] == va[:-1] + size[:-1]
    join &= r["level"][1:] == r["level"][:-1]
    join &= prot[1:] == prot[:-1]
    join &= r["eff"][1:] == r["eff"][:-1]
    if by_pa:
        join &= ((prot[1:] & np.uint64(e.P)) == 0) | (r["pa"][1:] == r["pa"][:-1] + size[:-1])
    if barriers is not None and len(barriers):
        # Look the few barriers up among the records, not every record among the barriers.
        at = np.searchsorted(va, barriers)
        hit = at < len(r)
        hit[hit] = va[at[hit]] == barriers[hit]
        at = at[hit]
        join[at[at > 0] - 1] = False
    if not join.any():
        return r
    starts = np.flatnonzero(np.concatenate(([True], ~join)))
    last = np.append(starts[1:], len(r)) - 1
    out = np.take(_whole(r), starts).view(r.dtype)
    grown = np.flatnonzero(last != starts)  # only these change size: gather just them from the strided fields
    tail = last[grown]
    out["size"][grown] = va[tail] + size[tail] - out["va"][grown]
    return out


def _whole(r: np.ndarray) -> np.ndarray:
    """Records as opaque rows: numpy moves packed structured records field by
    field, rows of bytes ten times faster (millions of them when aliases expand)."""
    return r.view(np.dtype((np.void, r.dtype.itemsize)))


def _holder(starts: np.ndarray, reach: np.uint64, va: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each va: whether one of the disjoint reaches [starts, starts + reach) holds it, and which."""
    window = np.searchsorted(starts, va, side="right") - 1
    inside = (window >= 0) & (va < starts[np.maximum(window, 0)] + reach)
    return inside, window


def _edges(start: np.ndarray, size: np.ndarray, *more: np.ndarray) -> np.ndarray:
    """The starts and ends of the reaches [start, start + size), with more addresses, sorted and distinct."""
    return sorted_unique(np.concatenate((start, start + size, *more)))


def sorted_unique(values: np.ndarray, *, first: bool = False, inverse: bool = False,
                  counts: bool = False) -> np.ndarray | tuple[np.ndarray, ...]:
    """np.unique() of a 1-D array: the distinct values, sorted, and as asked
    the index of each one's first occurrence, each value's index among them
    and how often each occurs. np.unique asks np.ma.is_masked(), whose
    import of numpy.ma costs every `ptilab dump` ~12 ms of start-up."""
    if not (first or inverse or counts):
        ordered = np.sort(values)
        return ordered[_starts_of_equal(ordered)]
    order = np.argsort(values, kind="stable")  # stable: the first of equal values is the first occurrence
    ordered = values[order]
    new = _starts_of_equal(ordered)
    out = [ordered[new]]
    if first:
        out.append(order[new])
    if inverse:
        out.append(np.empty(len(values), np.intp))
        out[-1][order] = np.cumsum(new) - 1
    if counts:
        out.append(np.diff(np.append(np.flatnonzero(new), len(values))))
    return tuple(out)


def _starts_of_equal(ordered: np.ndarray) -> np.ndarray:
    """Where each run of equal values of a sorted array starts."""
    new = np.empty(len(ordered), dtype=bool)
    new[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    return new


def _overlaps(lo: np.ndarray, hi: np.ndarray, want_lo: np.ndarray, want_hi: np.ndarray) -> np.ndarray:
    """Which [lo, hi) meet the union of the [want_lo, want_hi)."""
    order = np.argsort(want_lo, kind="stable")
    w_lo, w_hi = want_lo[order], np.maximum.accumulate(want_hi[order])
    i = np.searchsorted(w_lo, hi, side="left") - 1
    return (i >= 0) & (w_hi[np.maximum(i, 0)] > lo)


def _canonical(va: np.ndarray, geometry: Geometry) -> np.ndarray:
    top = np.uint64(1 << (geometry.va_bits - 1))
    ext = np.uint64(((1 << 64) - 1) ^ ((1 << geometry.va_bits) - 1))
    return np.where(va >= top, va | ext, va)


def _addr_mask(shift: int, maxphyaddr: int) -> np.uint64:
    return np.uint64(((1 << maxphyaddr) - 1) & ~((1 << shift) - 1))


def walk(mem: PhysicalMemory, cr3: CR3 | int, geometry: Geometry, *,
         maxphyaddr: int = e.PHYS_ADDR_BITS_MAX, max_entries: int = DEFAULT_MAX_ENTRIES,
         top_slots: tuple[int, int] = (0, 512), _summarise: bool = True) -> Walk:
    """Walk every entry reachable from cr3 and return the address space.

    Tables reached from several entries are read once per level; rows that
    reach one table with the same rights above it are walked once and the
    others recorded as aliases (see the module docstring). The entries
    actually decoded (walked rows x 512) are bounded by max_entries, past
    which WalkTooLarge is raised rather than spending unbounded time; the
    same bound applies to expanding Walk.ranges. top_slots limits the walk
    to top-level entries [first, last), e.g. (256, 512) for the kernel half.
    _summarise=False walks every alias (a reference for tests).
    """
    if isinstance(cr3, int):
        cr3 = CR3(cr3)
    root = np.array([cr3.pgd >> e.PAGE_SHIFT], dtype=np.uint64)
    if not mem.frames_present(root)[0]:
        raise FrameOutsideMemory(cr3.pgd)
    rows = _Rows(np.zeros(1, np.uint64), root, np.array([EFF_RW | EFF_US], np.uint8),
                 np.ones(1, np.int64), np.array([HALF_USER | HALF_KERNEL], np.uint8))
    found = _Found(barriers=_hole(geometry))
    decoded = 0
    for depth in range(geometry.levels):
        if not len(rows):
            break
        bits = _LevelBits.of(geometry, depth, maxphyaddr)
        rows, distinct = found.visit_tables(mem, rows, bits.name)
        data = mem.read_frames(distinct)
        records = []
        if depth > 0 and (bits.last or geometry.leaf_allowed(depth)):
            rows, runs = _contiguous_rows(data, rows, bits)
            records += runs
        if _summarise and depth > 0 and len(rows) > 1:
            rows = found.summarise(rows, bits)
        decoded += len(rows) * 512
        if decoded > max_entries:
            raise WalkTooLarge(
                f"the tables reference {len(rows)} distinct {bits.name} tables-with-rights "
                f"({len(distinct)} frames): decoding over {max_entries} entries; "
                f"the tables alias far beyond any real kernel")
        rows, decoded_records = found.decode_level(data, rows, bits, geometry, top_slots)
        records += decoded_records
        if len(records) > 1:
            joined = np.concatenate(records)
            joined = _whole(joined)[np.argsort(joined["va"], kind="stable")].view(RANGE_DTYPE)
            found.per_depth.append(_coalesce_within(joined, found.barriers))
        elif records:
            # Coalesced already (a batch by _decode_batch, whole tables by _run_records): coalescing is idempotent.
            found.per_depth.append(records[0])
    return found.walk(geometry, cr3, max_entries)


@dataclass
class _Rows:
    """One level's table references, in address order. table holds frame
    numbers until the level's tables are read, then each row's index into
    the level's distinct frames; weight is how many rows of the fully
    expanded tree a row stands for; halves says through which half of the
    top-level table it is reached."""

    va: np.ndarray  # raw virtual start of the reach
    table: np.ndarray
    eff: np.ndarray  # effective rights above the table: EFF_*
    weight: np.ndarray
    halves: np.ndarray

    def __len__(self) -> int:
        return len(self.va)

    def take(self, sel: np.ndarray) -> "_Rows":
        return _Rows(self.va[sel], self.table[sel], self.eff[sel], self.weight[sel], self.halves[sel])

    @staticmethod
    def concat(parts: list["_Rows"]) -> "_Rows":
        if not parts:
            return _Rows(np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.uint8),
                         np.zeros(0, np.int64), np.zeros(0, np.uint8))
        return _Rows(*(np.concatenate([getattr(p, f) for p in parts])
                       for f in ("va", "table", "eff", "weight", "halves")))


@dataclass(frozen=True)
class _LevelBits:
    """What an entry at one depth may hold (SDM Vol. 3A 4.5: the address bits
    up to MAXPHYADDR, reserved bits above it, PS and the large-page low bits)."""

    depth: int
    name: str
    shift: int
    last: bool
    leaf_allowed: bool
    leaf_mask: np.uint64
    table_mask: np.uint64
    reserved_high: np.uint64
    large_low: np.uint64

    @staticmethod
    def of(geometry: Geometry, depth: int, maxphyaddr: int) -> "_LevelBits":
        shift, last = geometry.shift(depth), depth == geometry.levels - 1
        return _LevelBits(depth, geometry.names[depth], shift, last, not last and geometry.leaf_allowed(depth),
                          _addr_mask(shift, maxphyaddr), _addr_mask(e.PAGE_SHIFT, maxphyaddr),
                          np.uint64(((1 << e.PHYS_ADDR_BITS_MAX) - 1) & ~((1 << maxphyaddr) - 1)),
                          np.uint64(e.large_page_reserved(shift)))


@dataclass
class _Found:
    """What the walk has found so far, level by level."""

    barriers: np.ndarray  # the hole between the halves and the edges of source reaches: never coalesce across
    tables: list[np.ndarray] = field(default_factory=list)
    table_refs: list[np.ndarray] = field(default_factory=list)
    table_halves: list[np.ndarray] = field(default_factory=list)
    per_depth: list[np.ndarray] = field(default_factory=list)
    alias_parts: list[np.ndarray] = field(default_factory=list)
    anomalies: list[Anomaly] = field(default_factory=list)

    def visit_tables(self, mem: PhysicalMemory, rows: _Rows, name: str) -> tuple[_Rows, np.ndarray]:
        """Note the level's distinct tables and drop the rows whose table lies
        outside memory; rows' table becomes an index into the distinct frames."""
        distinct, inverse = sorted_unique(rows.table, inverse=True)
        rows = _Rows(rows.va, inverse, rows.eff, rows.weight, rows.halves)
        refs = np.bincount(rows.table, weights=rows.weight, minlength=len(distinct)).astype(np.int64)
        inside = mem.frames_present(distinct)
        if not inside.all():
            bad = distinct[~inside]
            self.anomalies.append(Anomaly(
                "table-outside-memory", name, tuple(int(b) for b in bad[:16]), int(refs[~inside].sum()),
                f"{len(bad)} {name} table(s) lie past the end of physical memory "
                f"(first at {int(bad[0]) << 12:#x}); what they would map is unknown"))
            rows = rows.take(inside[rows.table])
            rows.table = (np.cumsum(inside) - 1)[rows.table]
            distinct, refs = distinct[inside], refs[inside]
        halves = np.zeros(len(distinct), dtype=np.uint8)
        np.bitwise_or.at(halves, rows.table, rows.halves)
        self.tables.append(distinct)
        self.table_refs.append(refs)
        self.table_halves.append(halves)
        return rows, distinct

    def summarise(self, rows: _Rows, bits: _LevelBits) -> _Rows:
        """Rows that share a table and the rights above it expand alike
        (ESPfix points thousands of entries at a handful of tables): keep
        the first, and record the others as aliases naming it as source."""
        key = rows.table.astype(np.int64) * 8 + rows.eff
        _, source, of_row, members = sorted_unique(key, first=True, inverse=True, counts=True)
        if len(source) == len(key):
            return rows
        alias = np.ones(len(key), dtype=bool)
        alias[source] = False
        reach = np.uint64(1 << (bits.shift + 9))
        out = np.empty(int(alias.sum()), dtype=ALIAS_DTYPE)
        out["va"] = rows.va[alias]
        out["size"] = reach
        out["source"] = rows.va[source[of_row[alias]]]
        out["level"] = bits.depth - 1
        self.alias_parts.append(out)
        shared = source[members > 1]
        self.barriers = _edges(rows.va[shared], np.full(len(shared), reach), self.barriers)
        weight = np.bincount(of_row, weights=rows.weight, minlength=len(source)).astype(np.int64)
        halves = np.zeros(len(source), dtype=np.uint8)
        np.bitwise_or.at(halves, of_row, rows.halves)
        # Back to address order: the next level's first row of a group must be its lowest.
        order = np.argsort(source)
        kept = rows.take(source[order])
        kept.weight, kept.halves = weight[order], halves[order]
        return kept

    def decode_level(self, data: np.ndarray, rows: _Rows, bits: _LevelBits, geometry: Geometry,
                     top_slots: tuple[int, int]) -> tuple[_Rows, list[np.ndarray]]:
        """Decode the rows' tables batch by batch: the records (leaves, holes,
        faulting entries) and the next level's rows."""
        records, below, bad_count, bad_values = [], [], 0, []
        for start in range(0, len(rows), BATCH_ROWS):
            batch = rows.take(slice(start, start + BATCH_ROWS))
            ent = data[batch.table]  # (rows, 512)
            if bits.depth == 0 and top_slots != (0, 512):
                ent = ent.copy()
                ent[:, :top_slots[0]] = 0
                ent[:, top_slots[1]:] = 0
            rec, next_rows, bad = _decode_batch(ent, batch, bits, self.barriers)
            if rec is not None:
                records.append(rec)
            if next_rows is not None:
                below.append(next_rows)
            if len(bad):
                bad_count += int(batch.weight[bad >> 9].sum())
                bad_values.append(sorted_unique(ent.reshape(-1)[bad]))
        if bad_count:
            values = sorted_unique(np.concatenate(bad_values))
            self.anomalies.append(Anomaly("reserved-bits", bits.name, tuple(int(x) for x in values[:16]), bad_count,
                                          f"{bad_count} {bits.name} entr(ies) have reserved bits set "
                                          f"(a real MMU faults with PFEC.RSVD); not followed"))
        return _Rows.concat(below), records

    def walk(self, geometry: Geometry, cr3: CR3, max_entries: int) -> Walk:
        ranges = np.concatenate(self.per_depth) if self.per_depth else np.zeros(0, RANGE_DTYPE)
        ranges = _whole(ranges)[np.argsort(ranges["va"], kind="stable")].view(RANGE_DTYPE)
        ranges["va"] = _canonical(ranges["va"], geometry)
        aliases = np.concatenate(self.alias_parts) if self.alias_parts else np.zeros(0, ALIAS_DTYPE)
        aliases = _whole(aliases)[np.argsort(aliases["va"], kind="stable")].view(ALIAS_DTYPE)
        aliases["va"] = _canonical(aliases["va"], geometry)
        aliases["source"] = _canonical(aliases["source"], geometry)
        self.anomalies.extend(_tables_at_several_levels(geometry, self.tables))
        return Walk(geometry, cr3, ranges, aliases, self.tables, self.table_refs, self.anomalies,
                    min(max_entries, DEFAULT_MAX_RECORDS), self.table_halves)


def _decode_batch(ent: np.ndarray, rows: _Rows, bits: _LevelBits,
                  barriers: np.ndarray) -> tuple[np.ndarray | None, _Rows | None, np.ndarray]:
    """One batch of tables (rows x 512 entries): its records, the rows one
    level down, and where (flat positions) entries fault on reserved bits
    (not followed). Records come out coalesced as _coalesce_within() would
    coalesce one record per emitted entry (see _batch_items)."""
    u64 = np.uint64
    flat = ent.reshape(-1)
    cuts = _cuts(rows, bits, barriers)
    at = _batch_items(flat, cuts)
    d = _decode_entries(flat[at], rows.eff[at >> 9], bits)
    join = _joins(d.emit, d.prot, d.eff, d.pa, u64(1 << bits.shift))
    join[np.searchsorted(at, cuts)] = False
    records = None
    first = np.flatnonzero(~join)  # a run, or a descended entry, begins at each
    run = first[d.emit[first]]
    if len(run):
        ends = np.append(at[first[1:]], len(flat))[d.emit[first]]
        rec = np.empty(len(run), dtype=RANGE_DTYPE)
        rec["va"] = _entry_va(at[run], rows, bits)
        rec["size"] = (ends - at[run]).astype(u64) << u64(bits.shift)
        rec["pa"] = d.pa[run]
        rec["level"] = bits.depth
        rec["prot"] = d.prot[run]
        rec["eff"] = d.eff[run]
        records = rec
    bad_at = at[d.bad]
    descend = np.flatnonzero(~d.emit)
    if bits.last or not len(descend):
        return records, None, bad_at
    pos = at[descend]
    row = pos >> 9
    halves = (np.where((pos & 511) < 256, np.uint8(HALF_USER), np.uint8(HALF_KERNEL)) if bits.depth == 0
              else rows.halves[row])
    below = _Rows(_entry_va(pos, rows, bits), (flat[pos] & bits.table_mask) >> u64(e.PAGE_SHIFT),
                  d.eff[descend], rows.weight[row], halves)
    return records, below, bad_at


@dataclass
class _Decoded:
    """Entries as the walk sees them: a record's fields, or a table to descend to (emit False)."""

    emit: np.ndarray  # a record: a leaf, a hole or a faulting entry
    bad: np.ndarray  # reserved bits set: shown as a hole, never followed
    prot: np.ndarray  # the record's flags (0 for a faulting entry)
    pa: np.ndarray  # the leaf's frame address (0 if not a leaf)
    eff: np.ndarray  # the rights along the walk (0 for a zero entry)


def _decode_entries(v: np.ndarray, parent_eff: np.ndarray, bits: _LevelBits) -> _Decoded:
    """Decode entries v of the level bits, each under its table's rights parent_eff."""
    u64 = np.uint64
    present = (v & u64(e.P)) != 0
    bad = present & ((v & bits.reserved_high) != 0)
    if bits.last:
        leaf = present & ~bad
    elif bits.leaf_allowed:
        leaf = present & ((v & u64(e.PS)) != 0)
        bad |= leaf & ((v & bits.large_low) != 0)
        leaf &= ~bad
    else:
        bad |= present & ((v & u64(e.PS)) != 0)
        leaf = np.zeros_like(present)
    eff = _effective(parent_eff, v)
    eff[v == 0] = 0
    # A faulting entry shows as a hole: hardware maps nothing there.
    return _Decoded(leaf | ~present | bad, bad, np.where(bad, u64(0), v & u64(e.FLAGS_MASK)),
                    np.where(leaf, v & bits.leaf_mask, u64(0)), eff)


def _batch_items(flat: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """Where the batch's items start (flat positions, ascending): an item is
    one present entry, or a run of equal non-present entries of one row up
    to the next cut (see _cuts). The entries of such a run decode alike and
    always join, so coalescing items gives what coalescing entries gives,
    for a cost in items (the cpu_entry_area's 1M PTEs are ~150 000 items:
    zeros, and guard pages whose entries repeat)."""
    begins = np.empty(len(flat), dtype=bool)
    begins[0] = True
    np.not_equal(flat[1:], flat[:-1], out=begins[1:])
    begins |= (flat & np.uint64(e.P)) != 0
    begins[::512] = True  # a row's rights differ from the next row's
    begins[cuts] = True
    return np.flatnonzero(begins)


def _cuts(rows: _Rows, bits: _LevelBits, barriers: np.ndarray) -> np.ndarray:
    """Flat positions of the entries no record may join to the one before:
    the first entry of a row not adjacent to the row before (the batch's
    first included) and the entries at an address in barriers."""
    u64 = np.uint64
    reach = u64(512 << bits.shift)
    apart = np.flatnonzero(np.concatenate(([True], rows.va[1:] != rows.va[:-1] + reach))) * 512
    row = np.searchsorted(rows.va, barriers, side="right") - 1
    inside = row >= 0
    row = row[inside]
    offset = barriers[inside] - rows.va[row]
    hit = (offset < reach) & ((offset & u64((1 << bits.shift) - 1)) == 0)
    at = row[hit] * 512 + (offset[hit] >> u64(bits.shift)).astype(np.intp)
    return np.concatenate((apart, at))


def _joins(emit: np.ndarray, prot: np.ndarray, eff: np.ndarray, pa: np.ndarray, stride: np.uint64) -> np.ndarray:
    """Whether each item joins the one before it (_coalesce_within's rule;
    the caller clears it at the cuts): both records, the same flags and
    rights, and a present one's frame right after the one before's."""
    join = np.empty(len(emit), dtype=bool)
    join[0] = False
    j = join[1:]
    np.logical_and(emit[1:], emit[:-1], out=j)
    j &= prot[1:] == prot[:-1]
    j &= eff[1:] == eff[:-1]
    present = (prot[1:] & np.uint64(e.P)) != 0
    j &= ~present | (pa[1:] == pa[:-1] + stride)
    return join


def _entry_va(pos: np.ndarray, rows: _Rows, bits: _LevelBits) -> np.ndarray:
    """The raw virtual address of the entries at flat positions pos of the batch."""
    return rows.va[pos >> 9] + ((pos & 511).astype(np.uint64) << np.uint64(bits.shift))


def _effective(parent_eff: np.ndarray, ent: np.ndarray) -> np.ndarray:
    """Rights along the walk (SDM 4.6): R/W and U/S must be set at every level, NX at any one."""
    u64 = np.uint64
    rw_us = ((ent & u64(e.RW)) != 0) * np.uint8(EFF_RW) | ((ent & u64(e.US)) != 0) * np.uint8(EFF_US)
    return (parent_eff & rw_us) | (parent_eff & np.uint8(EFF_NX)) | ((ent >> u64(63)).astype(np.uint8) * np.uint8(EFF_NX))


def _contiguous_rows(data: np.ndarray, rows: _Rows, bits: _LevelBits) -> tuple[_Rows, list[np.ndarray]]:
    """Rows whose table is one physically contiguous run of leaves become one
    record each, exactly what expanding and coalescing their 512 entries
    would give (a direct map in 4 KiB pages is thousands of such tables);
    the other rows are returned to be decoded."""
    run = _run_tables(data, bits.shift, bits.last, bits.reserved_high)
    if not run.any():
        return rows, []
    whole = run[rows.table]
    first = data[rows.table[whole], 0]
    records = _run_records(rows.va[whole], rows.eff[whole], first, bits)
    return rows.take(~whole), [records]


def _run_tables(data: np.ndarray, shift: int, last: bool, reserved_high: np.uint64) -> np.ndarray:
    """Which tables hold 512 present leaves mapping one physically contiguous
    range with the same flags: entry i is entry 0 plus i << shift, with no
    reserved bits and (above the last level) PS set."""
    u64 = np.uint64
    addr = u64(e.ADDRESS_MASK)
    stride = u64(1 << shift)
    e0, e511 = data[:, 0], data[:, 511]
    cand = (e0 & u64(e.P)) != 0
    if not last:
        cand &= (e0 & u64(e.PS)) != 0
        cand &= (e0 & u64(e.large_page_reserved(shift))) == 0
    cand &= ((e0 | e511) & reserved_high) == 0
    cand &= (e511 & ~addr) == (e0 & ~addr)
    cand &= (e511 & addr) == (e0 & addr) + u64(511) * stride
    out = np.zeros(len(data), dtype=bool)
    pick = np.flatnonzero(cand)
    for start in range(0, len(pick), BATCH_ROWS):
        rows = pick[start:start + BATCH_ROWS]
        block = data[rows]
        out[rows] = (np.diff(block, axis=1) == stride).all(axis=1)
    return out


def _run_records(va: np.ndarray, parent_eff: np.ndarray, first: np.ndarray, bits: _LevelBits) -> np.ndarray:
    """One record per row whose table is a contiguous run (see _run_tables)."""
    rec = np.empty(len(va), dtype=RANGE_DTYPE)
    rec["va"] = va
    rec["size"] = np.uint64(512 << bits.shift)
    rec["pa"] = first & bits.leaf_mask
    rec["level"] = bits.depth
    rec["prot"] = first & np.uint64(e.FLAGS_MASK)
    rec["eff"] = _effective(parent_eff, first)
    return coalesce(rec)


def _tables_at_several_levels(geometry: Geometry, tables: list[np.ndarray]) -> list[Anomaly]:
    """A frame used as a table at two depths: a loop (or a recursive self-map)."""
    found = []
    for depth in range(1, len(tables)):
        for upper in range(depth):
            both = np.intersect1d(tables[upper], tables[depth], assume_unique=True)
            if len(both):
                found.append(Anomaly(
                    "table-at-several-levels", geometry.names[depth], tuple(int(x) for x in both[:16]), len(both),
                    f"{len(both)} frame(s) serve as both {geometry.names[upper]} and {geometry.names[depth]} "
                    f"tables (first {int(both[0]) << 12:#x}): the tables loop back on themselves"))
    return found
