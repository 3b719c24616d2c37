"""MMU.run()'s compiled path: the rules of ptilab.mmu.tlb, caches and
MMU.walk() over a whole trace, in numba.

A set-associative LRU simulation is a sequential loop: each access's hit or
miss depends on the order of every access before it, so it does not
vectorise with numpy (the previous numpy path found runs of hits in bulk and
was slower than the scalar loop once misses were frequent). numba compiles
the loop; cache=True keeps the machine code in __pycache__ so only the first
run on a machine pays the compilation (bench/mmu.py times it apart).

The state (TLB sets in LRU order, paging-structure caches, data-cache lines)
is exported from the scalar reference objects into arrays, the trace runs,
and the state is written back: the reference objects stay the truth, and
after run() they hold exactly what access() on each address would have left.
The page tables the walks read are gathered beforehand, level by level over
the trace's distinct pages (vectorised); an access whose walk would need a
table not gathered stops the compiled loop and is done by the scalar path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numba import njit

from ptilab.mmu.caches import CachedEntry
from ptilab.mmu.tlb import GLOBAL, TLBEntry
from ptilab.paging import entry as e

if TYPE_CHECKING:
    from ptilab.mmu.mmu import MMU

# Fields of the TLB entry array E[field, set row, way].
VPN, SHIFT, TAG, PCID, FRAME, FLAGS, STAMP = range(7)
# Fields of the paging-structure-cache array P[field, depth, slot].
P_KEY, P_PCID, P_TABLE, P_FLAGS, P_STAMP = range(5)
F_GLOBAL, F_W, F_U, F_X = 1, 2, 4, 8
# Counters the compiled loop keeps: C[...]
C_ACCESSES, C_L1, C_STLB, C_WALKS, C_LOADS, C_DC_HITS, C_DC_MISSES, C_FAULTS, C_PSC = range(9)
ADDR_MASK = np.int64(((1 << e.PHYS_ADDR_BITS_MAX) - 1) & ~0xFFF)  # frame_address() of a table
P_BIT, RW_BIT, US_BIT, PS_BIT, G_BIT = e.P, e.RW, e.US, e.PS, e.G
PAT_LARGE_BIT = e.PAT_LARGE  # a large leaf's reserved bits start above it (e.large_page_reserved())
NX_BIT = np.int64(e.NX - (1 << 64))  # bit 63 as a signed 64-bit value


# -- the data cache: LRU list of lines plus an open-addressed hash of them -------
@njit(cache=True)
def _hash(line, mask):
    return (line * 2654435761) & mask


@njit(cache=True)
def _dc_find(ht, dc_line, line, mask):
    """The hash slot holding line, or -(free slot + 1)."""
    i = _hash(line, mask)
    while ht[i] != -1:
        if dc_line[ht[i]] == line:
            return i
        i = (i + 1) & mask
    return -(i + 1)


@njit(cache=True)
def _dc_delete(ht, dc_line, i, mask):
    """Empty slot i, shifting later probes back (linear probing without tombstones)."""
    j = i
    while True:
        j = (j + 1) & mask
        if ht[j] == -1:
            break
        k = _hash(dc_line[ht[j]], mask)
        if (i <= j and i < k <= j) or (i > j and (k > i or k <= j)):
            continue
        ht[i] = ht[j]
        i = j
    ht[i] = -1


@njit(cache=True)
def _dc_load(pa, ht, dc_line, dc_prev, dc_next, dc_state, mask):
    """DataCache.load(): True on a hit; the line becomes most recently used.
    dc_state: [count, head (least recent), tail (most recent)]."""
    line = pa >> 6
    slot = _dc_find(ht, dc_line, line, mask)
    if slot >= 0:
        node = ht[slot]
        if node != dc_state[2]:
            p, n = dc_prev[node], dc_next[node]
            if p == -1:
                dc_state[1] = n
            else:
                dc_next[p] = n
            dc_prev[n] = p
            dc_prev[node] = dc_state[2]
            dc_next[node] = -1
            dc_next[dc_state[2]] = node
            dc_state[2] = node
        return True
    if dc_state[0] < len(dc_line):
        node = dc_state[0]
        dc_state[0] += 1
    else:
        node = dc_state[1]
        _dc_delete(ht, dc_line, _dc_find(ht, dc_line, dc_line[node], mask), mask)
        dc_state[1] = dc_next[node]
        if dc_state[1] != -1:
            dc_prev[dc_state[1]] = -1
        else:
            dc_state[2] = -1
    dc_line[node] = line
    ht[-(_dc_find(ht, dc_line, line, mask) + 1)] = node
    dc_prev[node] = dc_state[2]
    dc_next[node] = -1
    if dc_state[2] != -1:
        dc_next[dc_state[2]] = node
    else:
        dc_state[1] = node
    dc_state[2] = node
    return False


# -- TLB arrays -------------------------------------------------------------------
@njit(cache=True, inline="always")
def _set_index(vpn, nsets):
    """vpn % nsets, without a division when nsets is a power of two (as in every real core)."""
    if (nsets & (nsets - 1)) == 0:
        return vpn & (nsets - 1)
    return vpn % nsets


@njit(cache=True, inline="always")  # on the hit path of every access: a call cost 5x the lookup itself
def _array_lookup(E, a, va, pcid, base, nsets, ways, shifts, clock):
    """TLBArray.lookup(): the (row, way) hit, made most recent, or (-1, -1).
    An entry of the current PCID wins over a global one for the same page."""
    for k in range(shifts.shape[1]):
        shift = shifts[a, k]
        if shift < 0:
            break
        vpn = np.int64(va >> np.uint64(shift))
        row = base[a] + _set_index(vpn, nsets[a])
        found = -1
        for w in range(ways[a]):
            if E[VPN, row, w] == vpn and E[STAMP, row, w] and E[SHIFT, row, w] == shift:
                tag = E[TAG, row, w]
                if tag == pcid:
                    found = w
                    break
                if tag == -1:
                    found = w
        if found >= 0:
            E[STAMP, row, found] = clock
            return row, found
    return -1, -1


@njit(cache=True)
def _array_fill(E, a, vpn, shift, tag, pcid, frame, flags, base, nsets, ways, clock):
    row = base[a] + _set_index(vpn, nsets[a])
    free, oldest = -1, 0
    for w in range(ways[a]):
        if E[STAMP, row, w] == 0:
            if free < 0:
                free = w
        elif E[VPN, row, w] == vpn and E[SHIFT, row, w] == shift and E[TAG, row, w] == tag:
            free = w
            break
        elif E[STAMP, row, w] < E[STAMP, row, oldest] or E[STAMP, row, oldest] == 0:
            oldest = w
    w = free if free >= 0 else oldest
    E[VPN, row, w], E[SHIFT, row, w], E[TAG, row, w], E[PCID, row, w] = vpn, shift, tag, pcid
    E[FRAME, row, w], E[FLAGS, row, w], E[STAMP, row, w] = frame, flags, clock


@njit(cache=True)
def _level_fill(E, first, count, va, shift, pcid, frame, flags, smash, base, nsets, ways, shifts, clock):
    """TLBLevel.fill(): the first array of the level holding the page size."""
    if smash and shift == 30:
        piece = np.int64(va >> np.uint64(21))
        frame = frame + ((piece << 21) & ((1 << 30) - 1))
        shift = 21
    tag = -1 if flags & F_GLOBAL else pcid
    vpn = np.int64(va >> np.uint64(shift))
    for a in range(first, first + count):
        for k in range(shifts.shape[1]):
            if shifts[a, k] == shift:
                _array_fill(E, a, vpn, shift, tag, pcid, frame, flags, base, nsets, ways, clock)
                return


@njit(cache=True)
def _level_lookup(E, first, count, va, pcid, base, nsets, ways, shifts, clock):
    for a in range(first, first + count):
        row, w = _array_lookup(E, a, va, pcid, base, nsets, ways, shifts, clock)
        if row >= 0:
            return row, w
    return -1, -1


# -- page tables --------------------------------------------------------------------
@njit(cache=True)
def _read_entry(pa, pfns, frames):
    """The 8-byte entry at pa, or (False, 0) if its table was not gathered."""
    pfn = pa >> 12
    i = np.searchsorted(pfns, pfn)
    if i == len(pfns) or pfns[i] != pfn:
        return False, np.int64(0)
    return True, frames[i, (pa & 0xFFF) >> 3]


@njit(cache=True)
def _psc_lookup(P, sizes, va, pcid, psc_shifts, va_mask, clock, touch):
    masked = va & va_mask
    for d in range(len(sizes) - 1, -1, -1):
        key = np.int64(masked >> np.uint64(psc_shifts[d]))
        for s in range(sizes[d]):
            if P[P_STAMP, d, s] and P[P_KEY, d, s] == key and P[P_PCID, d, s] == pcid:
                if touch:
                    P[P_STAMP, d, s] = clock
                return d, s
    return -1, -1


@njit(cache=True)
def _psc_fill(P, sizes, d, va, pcid, table, flags, psc_shifts, va_mask, clock):
    key = np.int64((va & va_mask) >> np.uint64(psc_shifts[d]))
    free, oldest = -1, 0
    for s in range(sizes[d]):
        if P[P_STAMP, d, s] == 0:
            if free < 0:
                free = s
        elif P[P_KEY, d, s] == key and P[P_PCID, d, s] == pcid:
            free = s
            break
        elif P[P_STAMP, d, s] < P[P_STAMP, d, oldest] or P[P_STAMP, d, oldest] == 0:
            oldest = s
    s = free if free >= 0 else oldest
    P[P_KEY, d, s], P[P_PCID, d, s], P[P_TABLE, d, s], P[P_FLAGS, d, s], P[P_STAMP, d, s] = \
        key, pcid, table, flags, clock


@njit(cache=True)
def _reserved(value, depth, last, leaf_ok, level_shifts):
    """translate.reserved_bits() with the architectural MAXPHYADDR."""
    if depth < last and value & PS_BIT:
        if not leaf_ok[depth]:
            return True
        low = ((np.int64(1) << level_shifts[depth]) - 1) & ~np.int64((PAT_LARGE_BIT << 1) - 1)
        if value & low:
            return True
    return False


@njit(cache=True)
def run_trace(vas, fetch, pgd, pcid, E, base, nsets, ways, shifts, roles, smash, P, sizes, psc_shifts,
              va_mask, level_shifts, leaf_ok, pfns, frames, ht, dc_line, dc_prev, dc_next, dc_state, C,
              loads, clock):
    """Translate vas in order (fetch[i]: an instruction fetch); returns
    (accesses done, clock). Stops early at an access whose walk needs a table
    not gathered. roles: (first array, count) of DTLB, ITLB, STLB, ISTLB."""
    mask = len(ht) - 1
    last = len(level_shifts) - 1
    path_pa = np.zeros(8, dtype=np.int64)
    path_value = np.zeros(8, dtype=np.int64)
    for i in range(len(vas)):
        va = vas[i]
        side = 1 if fetch[i] else 0
        clock += 1
        hit = False
        for a in range(roles[side, 0], roles[side, 0] + roles[side, 1]):
            row, w = _array_lookup(E, a, va, pcid, base, nsets, ways, shifts, clock)
            if row >= 0:
                hit = True
                break
        if hit:
            C[C_ACCESSES] += 1
            C[C_L1] += 1
            continue
        row, w = _level_lookup(E, roles[side + 2, 0], roles[side + 2, 1], va, pcid, base, nsets, ways, shifts,
                               clock)
        if row >= 0:
            C[C_ACCESSES] += 1
            C[C_STLB] += 1
            clock += 1
            _level_fill(E, roles[side, 0], roles[side, 1], va, E[SHIFT, row, w], E[PCID, row, w],
                        E[FRAME, row, w], E[FLAGS, row, w], False, base, nsets, ways, shifts, clock)
            continue
        # MMU.walk(): from the deepest paging-structure-cache hit down. The
        # entries are read first, so a table not gathered stops the loop
        # before this access changed anything.
        d, s = _psc_lookup(P, sizes, va, pcid, psc_shifts, va_mask, clock, False)
        depth, table, flags = 0, pgd, F_W | F_U | F_X
        if d >= 0:
            depth, table, flags = d + 1, P[P_TABLE, d, s], P[P_FLAGS, d, s]
        first = depth
        n_read = 0
        while True:
            pa = table + 8 * np.int64((va >> np.uint64(level_shifts[depth])) & np.uint64(0x1FF))
            ok, value = _read_entry(pa, pfns, frames)
            if not ok:
                return i, clock
            path_pa[n_read], path_value[n_read] = pa, value
            n_read += 1
            if not value & P_BIT or depth == last or value & PS_BIT:
                break
            table = value & ADDR_MASK
            depth += 1
        C[C_ACCESSES] += 1
        C[C_WALKS] += 1
        if d >= 0:
            C[C_PSC + d] += 1
            P[P_STAMP, d, s] = clock
        for r in range(n_read):
            depth, pa, value = first + r, path_pa[r], path_value[r]
            hit = _dc_load(pa, ht, dc_line, dc_prev, dc_next, dc_state, mask)
            if len(loads):
                loads[C[C_LOADS], 0], loads[C[C_LOADS], 1], loads[C[C_LOADS], 2] = depth, pa, hit
            C[C_LOADS] += 1
            C[C_DC_HITS if hit else C_DC_MISSES] += 1
            if not value & P_BIT or _reserved(value, depth, last, leaf_ok, level_shifts):
                C[C_FAULTS] += 1
                break
            if not value & RW_BIT:
                flags &= ~F_W
            if not value & US_BIT:
                flags &= ~F_U
            if value & NX_BIT:
                flags &= ~F_X
            if depth == last or value & PS_BIT:
                shift = level_shifts[depth]
                frame = value & ADDR_MASK & ~((np.int64(1) << shift) - 1)
                leaf = flags | (F_GLOBAL if value & G_BIT else 0)
                clock += 1
                _level_fill(E, roles[side + 2, 0], roles[side + 2, 1], va, shift, pcid, frame, leaf,
                            smash, base, nsets, ways, shifts, clock)
                _level_fill(E, roles[side, 0], roles[side, 1], va, shift, pcid, frame, leaf, False,
                            base, nsets, ways, shifts, clock)
                break
            if depth < len(sizes):
                clock += 1
                _psc_fill(P, sizes, depth, va, pcid, value & ADDR_MASK, flags, psc_shifts, va_mask, clock)
    return len(vas), clock


# -- the driver: reference objects <-> arrays ---------------------------------------
def run(mmu: "MMU", vas: np.ndarray, fetch: np.ndarray) -> None:
    """Play vas on mmu as access() would, the compiled loop doing the work.
    Tables are gathered lazily: the loop stops at a walk through a table it
    does not have, the path of that walk is read, and the loop goes on."""
    i, n = 0, len(vas)
    state = _export(mmu)
    pfns, frames = np.zeros(0, dtype=np.int64), np.zeros((0, 512), dtype=np.int64)
    loads = np.zeros((n * mmu.geometry.levels if mmu.record_loads else 0, 3), dtype=np.int64)
    counters = np.zeros(C_PSC + 4, dtype=np.int64)
    while True:
        done, state["clock"] = run_trace(
            vas[i:], fetch[i:], mmu.cr3.pgd, mmu.pcid, state["E"], state["base"], state["nsets"], state["ways"],
            state["shifts"], state["roles"], state["smash"], state["P"], state["sizes"], state["psc_shifts"],
            state["va_mask"], state["level_shifts"], state["leaf_ok"], pfns, frames, state["ht"], state["dc_line"],
            state["dc_prev"], state["dc_next"], state["dc_state"], counters, loads, state["clock"])
        i += done
        if i == n:
            break
        more_pfns, more_frames = _gather(mmu, vas[i:i + 1], state["P"], state["sizes"])
        new = ~np.isin(more_pfns, pfns)
        if new.any():
            pfns = np.concatenate((pfns, more_pfns[new]))
            frames = np.concatenate((frames, more_frames[new]))
            order = np.argsort(pfns)
            pfns, frames = pfns[order], frames[order]
            continue
        # A table the memory does not hold: the scalar path does what the memory says.
        _import(mmu, state, counters, loads)
        mmu.access(int(vas[i]), bool(fetch[i]))
        i += 1
        state = _export(mmu)
        counters[:] = 0
        loads[:] = 0
    _import(mmu, state, counters, loads)


def _export(mmu: "MMU") -> dict:
    tlb, psc, dcache = mmu.tlb, mmu.psc, mmu.dcache
    arrays = tlb.arrays
    nsets = np.array([a.nsets for a in arrays], dtype=np.int64)
    ways = np.array([a.ways for a in arrays], dtype=np.int64)
    base = np.concatenate(([0], np.cumsum(nsets)[:-1])).astype(np.int64)
    shifts = np.full((len(arrays), 3), -1, dtype=np.int64)
    for k, a in enumerate(arrays):
        shifts[k, :len(a.page_shifts)] = a.page_shifts
    E = np.zeros((7, int(nsets.sum()), int(ways.max())), dtype=np.int64)
    clock = 0
    for k, a in enumerate(arrays):
        for index, s in enumerate(a.sets):
            for w, entry in enumerate(s.values()):  # least recently used first
                clock += 1
                E[:, base[k] + index, w] = (entry.vpn, entry.page_shift, entry.tag, entry.pcid, entry.frame,
                                            _flags(entry), clock)
    roles = np.zeros((4, 2), dtype=np.int64)
    for r, level in enumerate((tlb.dtlb, tlb.itlb, tlb.stlb, tlb.istlb)):
        first = arrays.index(level.arrays[0]) if level.arrays else 0
        roles[r] = first, len(level.arrays)
    sizes = np.array(psc.sizes, dtype=np.int64)
    P = np.zeros((5, len(sizes), max(psc.sizes)), dtype=np.int64)
    for d, cache in enumerate(psc._caches):
        for slot, ((pcid, key), ce) in enumerate(cache.items()):
            clock += 1
            P[:, d, slot] = key, pcid, ce.table, _rights(ce.writable, ce.user, ce.executable), clock
    lines = list(dcache._lines)
    cap = dcache.capacity
    dc_line = np.zeros(cap, dtype=np.int64)
    dc_line[:len(lines)] = lines
    dc_prev = np.arange(-1, cap - 1, dtype=np.int64)
    dc_next = np.arange(1, cap + 1, dtype=np.int64)
    dc_next[max(len(lines) - 1, 0)] = -1
    dc_state = np.array([len(lines), 0 if lines else -1, len(lines) - 1], dtype=np.int64)
    ht = np.full(1 << max(4, (4 * cap - 1).bit_length()), -1, dtype=np.int64)
    hmask = len(ht) - 1
    for node, line in enumerate(lines):
        i = (line * 2654435761) & hmask
        while ht[i] != -1:
            i = (i + 1) & hmask
        ht[i] = node
    g = mmu.geometry
    return dict(E=E, base=base, nsets=nsets, ways=ways, shifts=shifts, roles=roles, smash=tlb.config.smash_1g,
                P=P, sizes=sizes, psc_shifts=np.array(psc._shifts, dtype=np.int64), va_mask=np.uint64(psc._mask),
                level_shifts=np.array(mmu._shifts, dtype=np.int64),
                leaf_ok=np.array([g.leaf_allowed(d) for d in range(g.levels)], dtype=np.bool_),
                ht=ht, dc_line=dc_line, dc_prev=dc_prev, dc_next=dc_next, dc_state=dc_state, clock=clock)


def _import(mmu: "MMU", state: dict, C: np.ndarray, loads: np.ndarray) -> None:
    E, base = state["E"], state["base"]
    for k, a in enumerate(mmu.tlb.arrays):
        for index, s in enumerate(a.sets):
            row = E[:, base[k] + index, :a.ways]
            s.clear()
            for w in np.argsort(row[STAMP], kind="stable"):
                if row[STAMP, w]:
                    vpn, shift, tag, pcid, frame, flags, _ = (int(x) for x in row[:, w])
                    s[(shift, vpn, tag)] = TLBEntry(vpn, shift, pcid, bool(flags & F_GLOBAL), frame,
                                                    bool(flags & F_W), bool(flags & F_U), bool(flags & F_X))
    P = state["P"]
    for d, cache in enumerate(mmu.psc._caches):
        cache.clear()
        for slot in np.argsort(P[P_STAMP, d], kind="stable"):
            if P[P_STAMP, d, slot]:
                key, pcid, table, flags, _ = (int(x) for x in P[:, d, slot])
                cache[(pcid, key)] = CachedEntry(table, bool(flags & F_W), bool(flags & F_U), bool(flags & F_X))
    dc = mmu.dcache
    dc._lines.clear()
    node, dc_line, dc_next = int(state["dc_state"][1]), state["dc_line"], state["dc_next"]
    while node != -1:
        dc._lines[int(dc_line[node])] = None
        node = int(dc_next[node])
    dc.hits += int(C[C_DC_HITS])
    dc.misses += int(C[C_DC_MISSES])
    st = mmu.stats
    st.accesses += int(C[C_ACCESSES])
    st.l1_hits += int(C[C_L1])
    st.stlb_hits += int(C[C_STLB])
    st.tlb_hits += int(C[C_L1] + C[C_STLB])
    st.tlb_misses += int(C[C_WALKS])
    st.walk_loads += int(C[C_LOADS])
    st.dcache_hits += int(C[C_DC_HITS])
    st.dcache_misses += int(C[C_DC_MISSES])
    st.faults += int(C[C_FAULTS])
    for d, name in enumerate(mmu.psc.names):
        if C[C_PSC + d]:
            st.psc_hits[name] += int(C[C_PSC + d])
    if mmu.record_loads:
        from ptilab.mmu.mmu import WalkLoad

        names, view = mmu.geometry.names, mmu.view
        mmu.loads.extend(WalkLoad(names[d], pa, view, bool(hit)) for d, pa, hit in loads[:int(C[C_LOADS])].tolist())


def _flags(entry: TLBEntry) -> int:
    return (F_GLOBAL if entry.global_ else 0) | _rights(entry.writable, entry.user, entry.executable)


def _rights(writable: bool, user: bool, executable: bool) -> int:
    return (F_W if writable else 0) | (F_U if user else 0) | (F_X if executable else 0)


def _gather(mmu: "MMU", vas: np.ndarray, P: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The table frames the walks of vas read: from the PGD, and from every
    table the paging-structure caches point at, level by level over the
    distinct pages (a frame the memory does not hold is left out)."""
    g, mem = mmu.geometry, mmu.mem
    pages = np.unique(vas >> np.uint64(12)) << np.uint64(12)
    roots = [(0, np.full(len(pages), mmu.cr3.pgd, dtype=np.uint64), pages)]
    for d in range(len(sizes)):
        for slot in np.flatnonzero(P[P_STAMP, d]):
            if P[P_PCID, d, slot] == mmu.pcid:
                key = (pages & np.uint64(mmu.psc._mask)) >> np.uint64(mmu.psc._shifts[d])
                mine = pages[key == np.uint64(P[P_KEY, d, slot])]
                roots.append((d + 1, np.full(len(mine), P[P_TABLE, d, slot], dtype=np.uint64), mine))
    found: dict[int, np.ndarray] = {}
    for depth, tables, va in roots:
        while len(va) and depth < g.levels:
            pfn = tables >> np.uint64(12)
            wanted, back = np.unique(pfn, return_inverse=True)
            inside = np.asarray(mem.frames_present(wanted), dtype=bool)
            rows = np.zeros((len(wanted), 512), dtype=np.uint64)
            if inside.any():
                rows[inside] = mem.read_frames(wanted[inside])
            for p, k in zip(wanted[inside].tolist(), np.flatnonzero(inside).tolist()):
                found.setdefault(p, rows[k])
            held = inside[back]
            value = rows[back, ((va >> np.uint64(g.shift(depth))) & np.uint64(0x1FF)).astype(np.int64)]
            down = held & (value & np.uint64(e.P) != 0) & (value & np.uint64(e.PS) == 0)
            tables, va = value[down] & np.uint64(ADDR_MASK), va[down]
            depth += 1
    pfns = np.array(sorted(found), dtype=np.int64)
    frames = np.stack([found[p] for p in pfns.tolist()]).view(np.int64) if len(pfns) \
        else np.zeros((0, 512), dtype=np.int64)
    return pfns, frames
