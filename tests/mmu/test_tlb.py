"""The MMU model on hand-built tables: counts worked out by hand."""

import numpy as np
import pytest

from ptilab.mmu.caches import DataCache
from ptilab.mmu.mmu import MMU
from ptilab.mmu.tlb import TLB, INVPCID_SINGLE_CONTEXT, l1_only
from ptilab.paging import FIVE_LEVEL, FOUR_LEVEL, translate
from ptilab.paging import entry as e
from ptilab.paging.cr3 import CR3_NOFLUSH
from ptilab.paging.install import map_page

USER_4K = e.P | e.RW | e.US | e.A | e.D
A, B, C = 0x40_0000, 0x40_1000, 0x40_2000  # three pages of one PTE table


def tables(bump, geometry=FOUR_LEVEL, pages=(A, B, C), flags=USER_4K):
    pgd = bump.alloc()
    for i, va in enumerate(pages):
        map_page(bump.ram, geometry, pgd, va, 0x1000_0000 + i * e.PAGE_SIZE, flags, bump.alloc,
                 table_flags=e.PAGE_TABLE)
    return pgd


def mmu_over(bump, pgd, geometry=FOUR_LEVEL, pcide=False, **tlb):
    mmu = MMU(bump.ram, geometry, pcide=pcide, tlb=TLB(l1_only(**tlb)) if tlb else None)
    mmu.mov_cr3(pgd)
    return mmu


def test_two_entry_fully_associative_tlb_counts_lru_by_hand(bump):
    # A B A C B A with 2 entries, LRU: miss miss hit miss(evicts B) miss(evicts A) miss(evicts C)
    mmu = mmu_over(bump, tables(bump), entries_4k=2, ways_4k=2)
    for va in (A, B, A, C, B, A):
        mmu.access(va)
    assert (mmu.stats.tlb_hits, mmu.stats.tlb_misses) == (1, 5)


def test_two_entry_direct_mapped_tlb_conflicts_on_even_pages(bump):
    # 2 sets of 1 way: A (vpn 0x400) and C (0x402) share set 0, B (0x401) has set 1.
    mmu = mmu_over(bump, tables(bump), entries_4k=2, ways_4k=1)
    for va in (A, B, C, A, B):
        mmu.access(va)
    assert (mmu.stats.tlb_hits, mmu.stats.tlb_misses) == (1, 4)


@pytest.mark.parametrize("geometry", [FOUR_LEVEL, FIVE_LEVEL])
def test_walk_loads_of_one_translation_are_the_levels_of_the_tree(bump, geometry):
    pgd = tables(bump, geometry)
    mmu = mmu_over(bump, pgd, geometry)
    mmu.access(B + 0x123)
    expected = [r.pa for r in translate(bump.ram, pgd, B + 0x123, geometry).reads]
    assert [load.pa for load in mmu.loads] == expected
    assert mmu.stats.walk_loads == geometry.levels


def test_a_pde_cache_hit_leaves_one_load_for_the_next_page(bump):
    mmu = mmu_over(bump, tables(bump))
    mmu.access(A)
    mmu.access(B)  # same PTE table: the PDE cache points straight at it
    assert mmu.stats.walk_loads == 4 + 1
    assert mmu.stats.psc_hits["PDE"] == 1


def test_global_entries_survive_a_cr3_write_without_pcid_and_others_do_not(bump):
    pgd = bump.alloc()
    map_page(bump.ram, FOUR_LEVEL, pgd, A, 0x1000_0000, e.PAGE_KERNEL, bump.alloc)  # G set
    map_page(bump.ram, FOUR_LEVEL, pgd, B, 0x1000_1000, e.PAGE_KERNEL & ~e.G, bump.alloc)
    mmu = mmu_over(bump, pgd)
    mmu.access(A), mmu.access(B)
    mmu.mov_cr3(pgd)
    assert mmu.access(A) is not None and mmu.stats.tlb_hits == 1
    mmu.access(B)
    assert mmu.stats.tlb_misses == 3


def test_pcid_tagged_entries_survive_a_noflush_switch_and_not_a_flushing_one(bump):
    pgd = tables(bump)
    other = tables(bump)
    mmu = MMU(bump.ram, FOUR_LEVEL, pcide=True)
    mmu.mov_cr3(pgd | 1)
    mmu.access(A)
    mmu.mov_cr3(other | 2)
    mmu.access(A)  # PCID 2 has its own entry
    mmu.mov_cr3(pgd | 1 | CR3_NOFLUSH)
    mmu.access(A)
    assert (mmu.stats.tlb_hits, mmu.stats.tlb_misses) == (1, 2)
    mmu.mov_cr3(pgd | 1)  # no NOFLUSH: PCID 1's non-global entries go
    mmu.access(A)
    assert mmu.stats.tlb_misses == 3
    mmu.mov_cr3(other | 2 | CR3_NOFLUSH)
    mmu.access(A)  # untouched by the flush of PCID 1
    assert mmu.stats.tlb_hits == 2


def test_invlpg_drops_a_global_page_and_invpcid_single_context_keeps_it(bump):
    pgd = bump.alloc()
    map_page(bump.ram, FOUR_LEVEL, pgd, A, 0x1000_0000, e.PAGE_KERNEL, bump.alloc)
    mmu = MMU(bump.ram, FOUR_LEVEL, pcide=True)
    mmu.mov_cr3(pgd | 1)
    mmu.access(A)
    mmu.invpcid(INVPCID_SINGLE_CONTEXT, 1)
    mmu.access(A)
    assert mmu.stats.tlb_hits == 1
    mmu.invlpg(A)
    mmu.access(A)
    assert mmu.stats.tlb_misses == 2


def test_large_pages_go_to_the_large_array(bump):
    pgd = bump.alloc()
    map_page(bump.ram, FOUR_LEVEL, pgd, 0x20_0000, 0x20_0000, e.PAGE_KERNEL_LARGE, bump.alloc, 21)
    mmu = mmu_over(bump, pgd)
    mmu.access(0x20_0000), mmu.access(0x3F_F000)
    assert (mmu.stats.tlb_hits, mmu.stats.walk_loads) == (1, 3)
    small, large_2m, _ = mmu.tlb.dtlb.arrays
    assert len(large_2m) == 1 and len(small) == 0


def test_a_fault_is_counted_and_not_cached(bump):
    mmu = mmu_over(bump, tables(bump))
    assert mmu.access(0x7000_0000) is None and mmu.access(0x7000_0000) is None
    assert mmu.stats.faults == 2 and len(mmu.tlb) == 0


def test_shared_tables_load_fewer_distinct_lines_than_copies(bump):
    """Two views walk the same address. Sharing the tables below the top
    level leaves 2 PGD lines + 3 shared lines; identical copies need 2 x 4."""
    def lines(shared: bool) -> int:
        kernel = tables(bump, pages=(A,))
        user = bump.alloc()
        if shared:
            bump.ram.write_entry(user, bump.ram.read_entry(kernel))  # pti_clone_p4d() style
        else:
            map_page(bump.ram, FOUR_LEVEL, user, A, 0x1000_0000, USER_4K, bump.alloc, table_flags=e.PAGE_TABLE)
        mmu = MMU(bump.ram, FOUR_LEVEL, dcache=DataCache(lines=64))
        mmu.mov_cr3(kernel, "kernel")
        mmu.access(A)
        mmu.mov_cr3(user, "user")
        mmu.access(A)
        assert mmu.stats.walk_loads == 8
        return len({load.line for load in mmu.loads}), mmu.stats.dcache_misses

    assert lines(shared=True) == (5, 5)
    assert lines(shared=False) == (8, 8)


def test_the_vectorised_run_matches_the_scalar_path_exactly(bump):
    rng = np.random.default_rng(7)
    pages = [0x40_0000 + 0x1000 * i for i in range(24)]
    pgd = tables(bump, pages=pages)
    map_page(bump.ram, FOUR_LEVEL, pgd, 0x4000_0000, 0x4000_0000, e.PAGE_KERNEL_LARGE, bump.alloc, 21)
    # Bursts of a few hot pages, then jumps: long hit runs with misses between.
    hot = np.array(pages + [0x4000_0000, 0x4010_0000, 0x9000_0000], dtype=np.uint64)  # the last one faults
    picks = np.repeat(rng.integers(0, len(hot), 400), rng.integers(1, 200, 400))
    vas = hot[picks] + rng.integers(0, 4096, len(picks)).astype(np.uint64)

    fast = mmu_over(bump, pgd, entries_4k=8, ways_4k=2, entries_large=2, ways_large=2)
    slow = mmu_over(bump, pgd, entries_4k=8, ways_4k=2, entries_large=2, ways_large=2)
    faults = fast.run(vas)
    for va in vas.tolist():
        slow.access(va)
    assert fast.stats == slow.stats and faults == slow.stats.faults > 0
    for a, b in zip(fast.tlb.arrays, slow.tlb.arrays):
        assert [list(s) for s in a.sets] == [list(s) for s in b.sets]  # same entries in the same LRU order


def test_a_fetch_fills_the_itlb_and_the_unified_stlb_serves_the_data_side(bump):
    from ptilab.mmu.tlb import SKYLAKE, ZEN2

    mmu = MMU(bump.ram, FOUR_LEVEL, tlb=TLB(SKYLAKE))
    mmu.mov_cr3(tables(bump))
    mmu.access(A, fetch=True)
    assert (len(mmu.tlb.itlb), len(mmu.tlb.dtlb), len(mmu.tlb.stlb)) == (1, 0, 1)
    mmu.access(A)  # a read of the page the code is on: DTLB miss, STLB hit, DTLB refilled
    assert mmu.level == "STLB" and len(mmu.tlb.dtlb) == 1
    mmu.access(A + 8)
    assert mmu.level == "L1" and (mmu.stats.l1_hits, mmu.stats.stlb_hits, mmu.stats.tlb_misses) == (1, 1, 1)
    # Zen 2's second level is split: the data side walks again.
    zen = MMU(bump.ram, FOUR_LEVEL, tlb=TLB(ZEN2))
    zen.mov_cr3(mmu.cr3.value)
    zen.access(A, fetch=True)
    zen.access(A)
    assert zen.level == "walk" and zen.stats.tlb_misses == 2


def test_a_1g_page_misses_l1_and_hits_the_second_level_as_its_2m_piece(bump):
    from ptilab.mmu.tlb import ZEN2

    pgd = bump.alloc()
    map_page(bump.ram, FOUR_LEVEL, pgd, 0x80_0000_0000, 0x4000_0000, e.PAGE_KERNEL_LARGE, bump.alloc, 30)
    mmu = MMU(bump.ram, FOUR_LEVEL, tlb=TLB(ZEN2))
    mmu.mov_cr3(pgd)
    mmu.access(0x80_0020_0123)
    (piece,) = mmu.tlb.stlb.arrays[0].entries()
    assert (piece.page_shift, piece.frame) == (21, 0x4020_0000)  # smashed: the 2 MiB that holds the access
    mmu.tlb.dtlb.arrays[0].invalidate(lambda entry: False)
    assert mmu.access(0x80_0030_0000).frame == 0x4020_0000 and mmu.level == "STLB"
