"""The MMU: CR3, the TLB, the paging-structure caches and the page walker,
reading the model's (or a real image's) tables entry by entry.

Two paths translate. access() is the scalar reference: a lookup in the TLB
hierarchy (first level, then the second level, which refills the first), and
on a miss a walk that starts below the deepest paging-structure-cache hit and
records each entry load and its cache line. run() takes a whole trace as a
numpy array and plays the same rules in compiled code (ptilab.mmu.fast,
numba): millions of translations per second whatever the hit rate. Both
paths give the same counts and the same final state (tests/mmu pins this
with a property test).

Rights are recorded in the TLB entries but not enforced: workloads are the
accesses real entry code makes, all of them legal.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ptilab.mmu.caches import LINE_SHIFT, CachedEntry, DataCache, PagingStructureCaches
from ptilab.mmu.tlb import INVPCID_ALL_INCLUDING_GLOBAL, INVPCID_ALL_NON_GLOBAL, L1, TLB, TLBEntry
from ptilab.paging import entry as e
from ptilab.paging.cr3 import CR3
from ptilab.paging.geometry import Geometry
from ptilab.paging.translate import reserved_bits

if TYPE_CHECKING:
    from ptilab.memory.physical import PhysicalMemory


@dataclass
class MMUStats:
    accesses: int = 0
    tlb_hits: int = 0  # l1_hits + stlb_hits
    l1_hits: int = 0  # found in the first-level DTLB or ITLB
    stlb_hits: int = 0  # missed the first level, found in the second (which refilled the first)
    tlb_misses: int = 0  # page walks
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
        self.level = ""  # where the last access() found its translation: L1, STLB or walk
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
    def access(self, va: int, fetch: bool = False) -> TLBEntry | None:
        """One access (an instruction fetch if fetch): the TLB entry that
        translated it, or None for a #PF. self.level says where it was found."""
        self.stats.accesses += 1
        entry, self.level = self.tlb.lookup(va, self.pcid, fetch)
        if entry is not None:
            self.stats.tlb_hits += 1
            if self.level == L1:
                self.stats.l1_hits += 1
            else:
                self.stats.stlb_hits += 1
            return entry
        self.stats.tlb_misses += 1
        entry = self.walk(va)
        if entry is None:
            self.stats.faults += 1
            return None
        self.tlb.fill(entry, va, fetch)
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

    def run(self, vas: np.ndarray, fetch: np.ndarray | bool = False) -> int:
        """Translate a trace of addresses under the current CR3, in order
        (fetch: instruction fetches, for all or per access); returns how many
        faulted. Same counts and final state as access() on each, compiled."""
        from ptilab.mmu import fast  # numba: only for the commands that run traces

        vas = np.ascontiguousarray(vas, dtype=np.uint64)
        fetch = np.broadcast_to(np.asarray(fetch, dtype=np.bool_), vas.shape).copy()
        faults_before = self.stats.faults
        fast.run(self, vas, fetch)
        return self.stats.faults - faults_before
