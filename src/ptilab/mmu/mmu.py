"""The MMU: CR3, the TLB, the paging-structure caches and the page walker,
reading the model's (or a real image's) tables entry by entry.

Two paths translate. access() is the scalar one: a TLB lookup, and on a miss
a walk that starts below the deepest paging-structure-cache hit and records
each entry load and its cache line. run() takes a whole trace as a numpy
array and finds runs of TLB hits in bulk (a hit changes nothing but LRU
order), falling back to access() only at the misses, so a hit-dominated
trace costs a few numpy passes rather than a Python loop per access. Both
paths give the same counts and the same final state (tests/mmu pins this).

Rights are recorded in the TLB entries but not enforced: workloads are the
accesses real entry code makes, all of them legal.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ptilab.mmu.caches import LINE_SHIFT, CachedEntry, DataCache, PagingStructureCaches
from ptilab.mmu.tlb import INVPCID_ALL_INCLUDING_GLOBAL, INVPCID_ALL_NON_GLOBAL, TLB, TLBEntry
from ptilab.paging import entry as e
from ptilab.paging.cr3 import CR3
from ptilab.paging.geometry import Geometry
from ptilab.paging.translate import reserved_bits

if TYPE_CHECKING:
    from ptilab.memory.physical import PhysicalMemory

# Hit runs are looked for in windows that grow while no miss turns up.
_WINDOW_MIN = 64
_WINDOW_MAX = 1 << 20


@dataclass
class MMUStats:
    accesses: int = 0
    tlb_hits: int = 0
    tlb_misses: int = 0
    walk_loads: int = 0  # 8-byte entries the walker read
    psc_hits: Counter[str] = field(default_factory=Counter)  # walks shortened by each paging-structure cache
    dcache_hits: int = 0
    dcache_misses: int = 0
    faults: int = 0
    cr3_writes: int = 0


@dataclass(frozen=True)
class WalkLoad:
    """One entry the walker read: its level, physical address and the view (CR3) it walked."""

    level: str
    pa: int
    view: str
    hit: bool  # in the data cache already

    @property
    def line(self) -> int:
        return self.pa >> LINE_SHIFT


class MMU:
    """One logical processor's translation machinery over physical memory."""

    def __init__(self, mem: PhysicalMemory, geometry: Geometry, *, pcide: bool = False, tlb: TLB | None = None,
                 psc: PagingStructureCaches | None = None, dcache: DataCache | None = None,
                 record_loads: bool = True):
        self.mem = mem
        self.geometry = geometry
        self.pcide = pcide  # CR4.PCIDE
        # `is None`, not `or`: an empty TLB has length 0 and would read as false.
        self.tlb = TLB() if tlb is None else tlb
        self.psc = PagingStructureCaches(geometry) if psc is None else psc
        self.dcache = DataCache() if dcache is None else dcache
        self.stats = MMUStats()
        self.cr3 = CR3(0, pcide)
        self.view = ""
        self.record_loads = record_loads
        self.loads: list[WalkLoad] = []
        self._shifts = tuple(geometry.shift(d) for d in range(geometry.levels))

    @property
    def pcid(self) -> int:
        return self.cr3.pcid

    # -- control registers and invalidation (SDM 4.10.4.1) ---------------------
    def mov_cr3(self, value: CR3 | int, view: str | None = None) -> None:
        """MOV to CR3. Without PCIDE every non-global translation (of PCID 000H)
        goes; with PCIDE those of the new PCID go unless bit 63 (NOFLUSH) is set.
        view names the tables for the per-view line accounting."""
        cr3 = CR3(value.value if isinstance(value, CR3) else value, self.pcide)
        if not cr3.noflush:
            self.tlb.flush_pcid(cr3.pcid)
            self.psc.flush_pcid(cr3.pcid)
        # Bit 63 is an instruction operand, never stored in CR3.
        self.cr3 = CR3(cr3.value & ~(1 << 63), self.pcide)
        self.view = view if view is not None else f"pgd {self.cr3.pgd:#x}"
        self.stats.cr3_writes += 1

    def invlpg(self, va: int) -> None:
        self.tlb.invlpg(va, self.pcid)
        self.psc.flush_pcid(self.pcid)

    def invpcid(self, kind: int, pcid: int = 0, va: int = 0) -> None:
        self.tlb.invpcid(kind, pcid, va)
        if kind in (INVPCID_ALL_INCLUDING_GLOBAL, INVPCID_ALL_NON_GLOBAL):
            self.psc.flush_all()
        else:
            self.psc.flush_pcid(pcid)

    # -- translation -------------------------------------------------------------
    def access(self, va: int) -> TLBEntry | None:
        """One access: the TLB entry that translated it, or None for a #PF."""
        self.stats.accesses += 1
        entry = self.tlb.lookup(va, self.pcid)
        if entry is not None:
            self.stats.tlb_hits += 1
            return entry
        self.stats.tlb_misses += 1
        entry = self.walk(va)
        if entry is None:
            self.stats.faults += 1
            return None
        self.tlb.fill(entry)
        return entry

    def walk(self, va: int) -> TLBEntry | None:
        """The page walk of a TLB miss, from the deepest paging-structure-cache
        hit down; fills those caches on the way. None if the walk faults."""
        g, mem, pcid = self.geometry, self.mem, self.pcid
        last = g.levels - 1
        cached = self.psc.lookup(va, pcid)
        if cached is None:
            depth, table, writable, user, executable = 0, self.cr3.pgd, True, True, True
        else:
            d, hit = cached
            self.stats.psc_hits[self.psc.names[d]] += 1
            depth, table, writable, user, executable = d + 1, hit.table, hit.writable, hit.user, hit.executable
        while True:
            pa = table + 8 * ((va >> self._shifts[depth]) & 0x1FF)
            self._load(depth, pa)
            value = mem.read_entry(pa)
            if not value & e.P or reserved_bits(value, depth, g):
                return None
            writable &= bool(value & e.RW)
            user &= bool(value & e.US)
            executable &= not value & e.NX
            if depth == last or value & e.PS:
                shift = self._shifts[depth]
                return TLBEntry(va >> shift, shift, pcid, bool(value & e.G), e.frame_address(value, shift),
                                writable, user, executable)
            table = e.frame_address(value)
            if depth < len(self.psc.names):
                self.psc.fill(depth, va, pcid, CachedEntry(table, writable, user, bool(executable)))
            depth += 1

    def _load(self, depth: int, pa: int) -> None:
        hit = self.dcache.load(pa)
        self.stats.walk_loads += 1
        if hit:
            self.stats.dcache_hits += 1
        else:
            self.stats.dcache_misses += 1
        if self.record_loads:
            self.loads.append(WalkLoad(self.geometry.names[depth], pa, self.view, hit))

    def run(self, vas: np.ndarray) -> int:
        """Translate a trace of addresses under the current CR3, in order;
        returns how many faulted. Same result as access() on each, faster."""
        vas = np.ascontiguousarray(vas, dtype=np.uint64)
        n = len(vas)
        small, large = self.tlb.small, self.tlb.large
        vpn4 = vas >> np.uint64(12)
        faults_before = self.stats.faults
        i, window = 0, _WINDOW_MIN
        while i < n:
            j = min(n, i + window)
            resident = small.resident(self.pcid) + large.resident(self.pcid)
            slot = _hit_slots(vpn4[i:j], vas[i:j], resident)
            missed = np.flatnonzero(slot < 0)
            run = int(missed[0]) if len(missed) else j - i
            if run:
                self._touch_run(slot[:run], resident)
                self.stats.accesses += run
                self.stats.tlb_hits += run
                i += run
            if len(missed):
                self.access(int(vas[i]))
                i += 1
                window = max(_WINDOW_MIN, window // 2)
            else:
                window = min(_WINDOW_MAX, window * 2)
        return self.stats.faults - faults_before

    def _touch_run(self, slot: np.ndarray, resident: list[np.ndarray]) -> None:
        """Replay the LRU effect of a run of hits: each entry hit becomes most
        recently used in the order of its last access in the run. The last
        accesses are found from the end backwards, in growing chunks, so a
        run costs a pass over its tail rather than a sort of all of it."""
        sizes = [len(r) for r in resident]
        wanted = set(np.flatnonzero(np.bincount(slot, minlength=sum(sizes))).tolist())
        last: list[tuple[int, int]] = []
        end, chunk = len(slot), 256
        while wanted:
            start = max(0, end - chunk)
            values, first = np.unique(slot[start:end][::-1], return_index=True)
            for value, f in zip(values.tolist(), first.tolist()):
                if value in wanted:
                    wanted.discard(value)
                    last.append((end - 1 - f, value))
            end, chunk = start, chunk * 4
        bounds = np.cumsum(sizes).tolist()
        pcid = self.pcid
        for _, value in sorted(last):
            k = next(a for a, b in enumerate(bounds) if value < b)
            vpn = int(resident[k][value - (bounds[k - 1] if k else 0)])
            shift = (12, 21, 30)[k]
            (self.tlb.small if k == 0 else self.tlb.large).touch(shift, vpn, pcid)


def _hit_slots(vpn4: np.ndarray, vas: np.ndarray, resident: list[np.ndarray]) -> np.ndarray:
    """Per access, the index of the entry a lookup would hit in the
    concatenation of the resident 4 KiB, 2 MiB and 1 GiB vpns, or -1 for a
    miss; in lookup order, so a page cached at two sizes counts where lookup()
    finds it."""
    slot = np.full(len(vas), -1, dtype=np.int64)
    offset = 0
    for shift, r in zip((12, 21, 30), resident):
        if len(r):
            rest = slot < 0
            if not rest.any():
                break
            x = vpn4 if shift == 12 else vas >> np.uint64(shift)
            at = np.searchsorted(r, x)
            at[at == len(r)] = 0
            hit = rest & (r[at] == x)
            slot[hit] = at[hit] + offset
        offset += len(r)
    return slot
