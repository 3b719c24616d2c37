"""The compiled trace path (MMU.run) against the scalar reference (MMU.access):
same counts, same final TLB, paging-structure-cache and data-cache state, on
random traces with CR3 writes and invalidations between their pieces."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ptilab.mmu.caches import DataCache, PagingStructureCaches
from ptilab.mmu.mmu import MMU
from ptilab.mmu.tlb import CORES, TLB, TLBConfig, ArrayShape
from ptilab.paging import FOUR_LEVEL
from ptilab.paging import entry as e
from ptilab.paging.cr3 import CR3_NOFLUSH
from ptilab.paging.install import map_page
from tests.conftest import BumpTables

# Small arrays so that random traces evict, and each real core's layout.
TINY = TLBConfig("tiny", dtlb=(ArrayShape(4, 2, (12,)), ArrayShape(2, 2, (21, 30))),
                 itlb=(ArrayShape(2, 1, (12, 21, 30)),), stlb=(ArrayShape(8, 2, (12, 21)),),
                 istlb=(ArrayShape(4, 4, (12, 21)),), smash_1g=True)
CONFIGS = [TINY, *CORES.values()]


def _space():
    """Two address spaces over one RAM: 4 KiB pages (some global), a 2 MiB and a 1 GiB page, a hole."""
    bump = BumpTables()
    pgds = []
    for n in range(2):
        pgd = bump.alloc()
        for i in range(48):
            flags = e.PAGE_KERNEL if i % 5 == 0 else e.P | e.RW | e.US | e.A | e.D
            map_page(bump.ram, FOUR_LEVEL, pgd, 0x40_0000 + (i * 37 % 48) * 0x1000 + n * 0x20_0000 * (i % 2),
                     0x100_0000 + i * 0x1000, flags, bump.alloc)
        map_page(bump.ram, FOUR_LEVEL, pgd, 0x4000_0000, 0x4000_0000, e.PAGE_KERNEL_LARGE, bump.alloc, 21)
        map_page(bump.ram, FOUR_LEVEL, pgd, 0x80_0000_0000, 0x8000_0000, e.PAGE_KERNEL_LARGE & ~e.G, bump.alloc, 30)
        pgds.append(pgd)
    return bump, pgds


PAGES = np.array([0x40_0000 + i * 0x1000 for i in range(48)] + [0x60_0000 + i * 0x1000 for i in range(48)]
                 + [0x4000_0000, 0x4010_0000, 0x80_0000_0000, 0x80_1234_5000, 0x80_3FE0_0000, 0x9000_0000],
                 dtype=np.uint64)

# Half the picks among the large pages and the hole, so smashing and faults are exercised.
pick = st.one_of(st.integers(0, len(PAGES) - 1), st.integers(len(PAGES) - 6, len(PAGES) - 1))
piece = st.tuples(st.lists(pick, min_size=1, max_size=60),
                  st.lists(st.booleans(), min_size=1, max_size=60))
between = st.sampled_from(["cr3", "cr3-noflush", "other-pcid", "invlpg", "invpcid0", "invpcid1", "invpcid2",
                           "invpcid3"])


@settings(max_examples=80, deadline=None)
@given(config=st.sampled_from(CONFIGS), pcide=st.booleans(), steps=st.lists(st.tuples(piece, between), max_size=6),
       seed=st.integers(0, 2**32 - 1))
def test_compiled_run_equals_the_scalar_reference(config, pcide, steps, seed):
    bump, pgds = _space()
    rng = np.random.default_rng(seed)

    def fresh():
        m = MMU(bump.ram, FOUR_LEVEL, pcide=pcide, tlb=TLB(config), dcache=DataCache(lines=6),
                psc=PagingStructureCaches(FOUR_LEVEL, {"PML4E": 1, "PDPTE": 2, "PDE": 3}))
        m.mov_cr3(pgds[0] | (1 if pcide else 0))
        return m

    fast, slow = fresh(), fresh()
    for (picks, kinds), op in steps:
        vas = PAGES[picks] + rng.integers(0, 4096, len(picks)).astype(np.uint64)
        fetch = np.resize(np.array(kinds), len(vas))
        fast.run(vas, fetch)
        for va, f in zip(vas.tolist(), fetch.tolist()):
            slow.access(va, f)
        for m in (fast, slow):
            _between(m, op, pgds, pcide, int(vas[0]))
    assert fast.stats == slow.stats
    assert fast.loads == slow.loads
    for a, b in zip(fast.tlb.arrays, slow.tlb.arrays):
        assert [list(s.items()) for s in a.sets] == [list(s.items()) for s in b.sets]
    assert [list(c.items()) for c in fast.psc._caches] == [list(c.items()) for c in slow.psc._caches]
    assert list(fast.dcache._lines) == list(slow.dcache._lines)


def _between(m: MMU, op: str, pgds: list[int], pcide: bool, va: int) -> None:
    pcid = 1 if pcide else 0
    if op == "cr3":
        m.mov_cr3(pgds[1] | pcid)
    elif op == "cr3-noflush":
        m.mov_cr3(pgds[0] | pcid | (CR3_NOFLUSH if pcide else 0))
    elif op == "other-pcid":
        m.mov_cr3(pgds[1] | (2 if pcide else 0) | (CR3_NOFLUSH if pcide else 0))
    elif op == "invlpg":
        m.invlpg(va)
    else:
        m.invpcid(int(op[-1]), pcid, va)


def test_a_miss_heavy_trace_hits_each_level_and_walks():
    """256 pages overflow Skylake's 64-entry DTLB and fit its 1536-entry STLB."""
    bump = BumpTables()
    pgd = bump.alloc()
    for i in range(256):
        map_page(bump.ram, FOUR_LEVEL, pgd, 0x40_0000 + i * 0x1000, 0x100_0000 + i * 0x1000, e.PAGE_KERNEL, bump.alloc)
    fast = MMU(bump.ram, FOUR_LEVEL, tlb=TLB(CORES["skylake"]), record_loads=False)
    fast.mov_cr3(pgd)
    rng = np.random.default_rng(1)
    fast.run(np.uint64(0x40_0000) + rng.integers(0, 257, 5000).astype(np.uint64) * np.uint64(0x1000))
    s = fast.stats
    assert s.l1_hits and s.stlb_hits > s.l1_hits and s.tlb_misses and s.faults
    assert s.accesses == s.l1_hits + s.stlb_hits + s.tlb_misses == 5000
