"""The whole tree at once: a vectorised walk that turns page tables into ranges.

Each level is one numpy pass over the rows (table references) of that level;
each distinct table frame is read once per level however often it is
referenced. The result lists every leaf mapping and every non-present entry
the tables hold, coalesced into runs the way Linux's ptdump coalesces them,
but never across a physical discontinuity, so a range is exact: its pages map
pa, pa + 4K, ... with the same entry flags and effective rights.

Two shortcuts keep big trees cheap without changing the answer: a table of
512 leaves mapping one contiguous physical range with the same flags becomes
one run per reference (a direct map in 4 KiB pages), and rows that reach the
same table with the same rights above it are expanded once and copied (the
ESPfix area's 65536 aliases of one page).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
EFF_RW = 1
EFF_US = 2
EFF_NX = 4

# Rows of 512 entries expanded at once: bounds the walk's working memory.
BATCH_ROWS = 4096
DEFAULT_MAX_ENTRIES = 1 << 27


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
    """A walked address space: ranges in address order, and what the walk saw on the way."""

    geometry: Geometry
    cr3: CR3
    ranges: np.ndarray  # RANGE_DTYPE, sorted by va
    tables: list[np.ndarray]  # per depth: distinct table frame numbers visited
    table_refs: list[np.ndarray]  # per depth: how many entries referenced each of them
    anomalies: list[Anomaly] = field(default_factory=list)

    @property
    def mapped(self) -> np.ndarray:
        return self.ranges[(self.ranges["prot"] & e.P) != 0]

    def table_pages(self) -> int:
        return int(sum(len(t) for t in self.tables))

    def all_table_frames(self) -> np.ndarray:
        return np.unique(np.concatenate(self.tables)) if self.tables else np.zeros(0, np.uint64)

    def mapped_bytes(self) -> int:
        return int(self.mapped["size"].sum())


def coalesce(r: np.ndarray, by_pa: bool = True) -> np.ndarray:
    """Join address-adjacent runs with the same level, flags and rights (and,
    with by_pa, physically contiguous frames). r must be sorted by va."""
    if len(r) <= 1:
        return r
    va, size = r["va"], r["size"]
    join = (va[1:] == va[:-1] + size[:-1])
    join &= r["level"][1:] == r["level"][:-1]
    join &= r["prot"][1:] == r["prot"][:-1]
    join &= r["eff"][1:] == r["eff"][:-1]
    if by_pa:
        present = (r["prot"][1:] & e.P) != 0
        join &= ~present | (r["pa"][1:] == r["pa"][:-1] + size[:-1])
    starts = np.flatnonzero(np.concatenate(([True], ~join)))
    if len(starts) == len(r):
        return r
    last = np.concatenate((starts[1:], [len(r)])) - 1
    out = r[starts].copy()
    out["size"] = va[last] + size[last] - va[starts]
    return out


def _addr_mask(shift: int, maxphyaddr: int) -> np.uint64:
    return np.uint64(((1 << maxphyaddr) - 1) & ~((1 << shift) - 1))


def walk(mem: PhysicalMemory, cr3: CR3 | int, geometry: Geometry, *,
         maxphyaddr: int = e.PHYS_ADDR_BITS_MAX, max_entries: int = DEFAULT_MAX_ENTRIES,
         top_slots: tuple[int, int] = (0, 512)) -> Walk:
    """Walk every entry reachable from cr3 and return the address space as ranges.

    Tables reached from several entries are read once per level; the number
    of entries expanded (references x 512) is bounded by max_entries, past
    which WalkTooLarge is raised rather than spending unbounded time.
    top_slots limits the walk to top-level entries [first, last), e.g.
    (256, 512) for the kernel half.
    """
    if isinstance(cr3, int):
        cr3 = CR3(cr3)
    root = np.array([cr3.pgd >> e.PAGE_SHIFT], dtype=np.uint64)
    if not mem.frames_present(root)[0]:
        raise FrameOutsideMemory(cr3.pgd)

    u64 = np.uint64
    row_va = np.zeros(1, dtype=u64)
    row_table = root
    row_eff = np.array([EFF_RW | EFF_US], dtype=np.uint8)
    expanded = 0
    per_depth: list[np.ndarray] = []
    tables: list[np.ndarray] = []
    table_refs: list[np.ndarray] = []
    anomalies: list[Anomaly] = []
    index = np.arange(512, dtype=u64)
    last_depth = geometry.levels - 1

    for depth in range(geometry.levels):
        name = geometry.names[depth]
        if len(row_table) == 0:
            break
        expanded += len(row_table) * 512
        if expanded > max_entries:
            raise WalkTooLarge(
                f"the tables reference {len(row_table)} {name} tables "
                f"({len(np.unique(row_table))} distinct): expanding over {max_entries} entries; "
                f"the tables alias far beyond any real kernel")
        distinct, inverse, refs = np.unique(row_table, return_inverse=True, return_counts=True)
        inside = mem.frames_present(distinct)
        if not inside.all():
            bad = distinct[~inside]
            anomalies.append(Anomaly("table-outside-memory", name, tuple(int(b) for b in bad[:16]),
                                     int(refs[~inside].sum()),
                                     f"{len(bad)} {name} table(s) lie past the end of physical memory "
                                     f"(first at {int(bad[0]) << 12:#x}); what they would map is unknown"))
            keep = inside[inverse]
            row_va, row_eff, inverse = row_va[keep], row_eff[keep], inverse[keep]
            remap = np.cumsum(inside) - 1
            inverse = remap[inverse]
            distinct, refs = distinct[inside], refs[inside]
        tables.append(distinct)
        table_refs.append(refs)
        data = mem.read_frames(distinct)
        shift = geometry.shift(depth)
        step = index << u64(shift)
        records: list[np.ndarray] = []
        next_va: list[np.ndarray] = []
        next_table: list[np.ndarray] = []
        next_eff: list[np.ndarray] = []
        leaf_mask = _addr_mask(shift, maxphyaddr)
        table_mask = _addr_mask(e.PAGE_SHIFT, maxphyaddr)
        reserved_high = u64(((1 << e.PHYS_ADDR_BITS_MAX) - 1) & ~((1 << maxphyaddr) - 1))
        large_low = u64(((1 << shift) - 1) & ~((1 << 13) - 1))
        if depth > 0 and (depth == last_depth or geometry.leaf_allowed(depth)):
            run = _run_tables(data, shift, depth == last_depth, reserved_high)
            if run.any():
                # Rows whose table is one physically contiguous run of leaves
                # become one record each, exactly what expanding and
                # coalescing their 512 entries would give (a direct map in
                # 4 KiB pages is thousands of such tables).
                whole = run[inverse]
                first = data[inverse[whole], 0]
                records.append(_run_records(row_va[whole], row_eff[whole], first, shift, depth, leaf_mask))
                row_va, row_eff, inverse = row_va[~whole], row_eff[~whole], inverse[~whole]
        # Rows that share a table and the rights above it expand alike (ESPfix
        # points thousands of entries at a handful of tables): expand each
        # such pair once, then copy the result to every row that has it.
        share = _Sharing.plan(inverse, row_va, row_eff, shift)
        if share is None:
            b_inverse, b_va, b_eff, weight, out = inverse, row_va, row_eff, None, records
        else:
            b_inverse, b_va, b_eff, weight, out = share.inverse, share.va, share.eff, share.weight, []
        for start in range(0, len(b_inverse), BATCH_ROWS):
            sl = slice(start, start + BATCH_ROWS)
            ent = data[b_inverse[sl]]  # (rows, 512)
            if depth == 0 and top_slots != (0, 512):
                ent = ent.copy()
                ent[:, :top_slots[0]] = 0
                ent[:, top_slots[1]:] = 0
            va = b_va[sl, None] + step
            present = (ent & u64(e.P)) != 0
            ps = (ent & u64(e.PS)) != 0
            bad = present & ((ent & reserved_high) != 0)
            if depth == last_depth:
                leaf = present
            elif geometry.leaf_allowed(depth):
                leaf = present & ps
                bad |= leaf & ((ent & large_low) != 0)
            else:
                bad |= present & ps
                leaf = np.zeros_like(present)
            if bad.any():
                count = int(bad.sum() if weight is None else (bad.sum(axis=1) * weight[sl]).sum())
                anomalies.append(Anomaly("reserved-bits", name, tuple(int(x) for x in np.unique(ent[bad])[:16]),
                                         count,
                                         f"{count} {name} entr(ies) have reserved bits set "
                                         f"(a real MMU faults with PFEC.RSVD); not followed"))
                leaf &= ~bad
            parent_eff = b_eff[sl, None]
            rw_us = ((ent & u64(e.RW)) != 0) * np.uint8(EFF_RW) | ((ent & u64(e.US)) != 0) * np.uint8(EFF_US)
            eff = (parent_eff & rw_us) | (parent_eff & np.uint8(EFF_NX)) | ((ent >> u64(63)).astype(np.uint8) * np.uint8(EFF_NX))
            emit = leaf | ~present | bad
            if emit.any():
                rec = np.empty(int(emit.sum()), dtype=RANGE_DTYPE)
                ent_e = ent[emit]
                is_leaf = leaf[emit]
                rec["va"] = va[emit]
                rec["size"] = u64(1 << shift)
                rec["pa"] = np.where(is_leaf, ent_e & leaf_mask, u64(0))
                rec["level"] = depth
                # A faulting entry shows as a hole: hardware maps nothing there.
                rec["prot"] = np.where(bad[emit], u64(0), ent_e & u64(e.FLAGS_MASK))
                rec["eff"] = np.where(ent_e == 0, np.uint8(0), eff[emit])
                out.append(coalesce(rec))
            descend = present & ~leaf & ~bad
            if depth < last_depth and descend.any():
                next_va.append(va[descend])
                next_table.append((ent[descend] & table_mask) >> u64(e.PAGE_SHIFT))
                next_eff.append(eff[descend])
        if share is not None:
            if out:
                records.append(share.place_records(np.concatenate(out)))
            if next_va:
                idx, va = share.copies(np.concatenate(next_va))
                next_va, next_table, next_eff = [va], [np.concatenate(next_table)[idx]], [np.concatenate(next_eff)[idx]]
        if records:
            joined = np.concatenate(records)
            if len(records) > 1:
                joined = joined[np.argsort(joined["va"], kind="stable")]
            per_depth.append(coalesce(joined))
        if depth < last_depth:
            row_va = np.concatenate(next_va) if next_va else np.zeros(0, u64)
            row_table = np.concatenate(next_table) if next_table else np.zeros(0, u64)
            row_eff = np.concatenate(next_eff) if next_eff else np.zeros(0, np.uint8)

    ranges = np.concatenate(per_depth) if per_depth else np.zeros(0, RANGE_DTYPE)
    ranges = ranges[np.argsort(ranges["va"], kind="stable")]
    top = u64(1 << (geometry.va_bits - 1))
    ext = u64(((1 << 64) - 1) ^ ((1 << geometry.va_bits) - 1))
    ranges["va"] = np.where(ranges["va"] >= top, ranges["va"] | ext, ranges["va"])
    anomalies.extend(_tables_at_several_levels(geometry, tables))
    return Walk(geometry, cr3, ranges, tables, table_refs, anomalies)


@dataclass
class _Sharing:
    """Rows grouped by (table, rights above it): each group is expanded once,
    as one template row at address k * span, and copied to its rows after."""

    inverse: np.ndarray  # per template: index of its table among the level's distinct tables
    va: np.ndarray  # per template: its private address
    eff: np.ndarray  # per template: the rights above it
    weight: np.ndarray  # per template: how many rows it stands for
    of_row: np.ndarray  # per row: its template
    row_va: np.ndarray  # per row: its address
    span: int

    @classmethod
    def plan(cls, inverse: np.ndarray, row_va: np.ndarray, row_eff: np.ndarray, shift: int) -> "_Sharing | None":
        """A plan when rows repeat enough to be worth it, else None."""
        if len(inverse) < 64:
            return None
        # Twice a table's reach apart: one template's runs never touch the next one's, so never coalesce.
        span = 2 << (shift + 9)
        key = inverse.astype(np.int64) * 8 + row_eff
        templates, of_row = np.unique(key, return_inverse=True)
        if len(templates) * 2 > len(key) or len(templates) * span >= 1 << 64:
            return None
        return cls((templates // 8).astype(np.intp), np.arange(len(templates), dtype=np.uint64) * np.uint64(span),
                   (templates % 8).astype(np.uint8), np.bincount(of_row, minlength=len(templates)),
                   of_row.reshape(-1), row_va, span)

    def copies(self, template_va: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For template items at sorted addresses template_va: which item each
        copy is, and the copy's address, in address order."""
        span = np.uint64(self.span)
        k = (template_va // span).astype(np.intp)
        rel = template_va - k.astype(np.uint64) * span
        counts = np.bincount(k, minlength=len(self.va))
        starts = np.cumsum(counts) - counts
        n = counts[self.of_row]
        ends = np.cumsum(n)
        owner = np.repeat(np.arange(len(self.of_row)), n)
        idx = np.repeat(starts[self.of_row] - (ends - n), n) + np.arange(int(ends[-1]) if len(ends) else 0)
        return idx, self.row_va[owner] + rel[idx]

    def place_records(self, template: np.ndarray) -> np.ndarray:
        idx, va = self.copies(template["va"])
        out = template[idx]
        out["va"] = va
        return out  # the level's records are coalesced together afterwards


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
        cand &= (e0 & u64(((1 << shift) - 1) & ~((1 << 13) - 1))) == 0
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


def _run_records(va: np.ndarray, parent_eff: np.ndarray, first: np.ndarray, shift: int, depth: int,
                 leaf_mask: np.uint64) -> np.ndarray:
    """One record per row whose table is a contiguous run (see _run_tables)."""
    u64 = np.uint64
    rec = np.empty(len(va), dtype=RANGE_DTYPE)
    rec["va"] = va
    rec["size"] = u64(512 << shift)
    rec["pa"] = first & leaf_mask
    rec["level"] = depth
    rec["prot"] = first & u64(e.FLAGS_MASK)
    rw_us = ((first & u64(e.RW)) != 0) * np.uint8(EFF_RW) | ((first & u64(e.US)) != 0) * np.uint8(EFF_US)
    rec["eff"] = (parent_eff & rw_us) | (parent_eff & np.uint8(EFF_NX)) | \
        ((first >> u64(63)).astype(np.uint8) * np.uint8(EFF_NX))
    return coalesce(rec)


def _tables_at_several_levels(geometry: Geometry, tables: list[np.ndarray]) -> list[Anomaly]:
    """A frame used as a table at two depths: a loop (or a recursive self-map)."""
    found = []
    for depth in range(1, len(tables)):
        for upper in range(depth):
            both = np.intersect1d(tables[upper], tables[depth])
            if len(both):
                found.append(Anomaly(
                    "table-at-several-levels", geometry.names[depth], tuple(int(x) for x in both[:16]), len(both),
                    f"{len(both)} frame(s) serve as both {geometry.names[upper]} and {geometry.names[depth]} "
                    f"tables (first {int(both[0]) << 12:#x}): the tables loop back on themselves"))
    return found
