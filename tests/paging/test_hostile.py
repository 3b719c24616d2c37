"""Adversarial tables: every walk stays bounded, names the anomaly, and repeats itself."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptilab.errors import PtilabError, WalkTooLarge
from ptilab.memory.simulated import SimulatedRAM
from ptilab.paging import FIVE_LEVEL, FOUR_LEVEL, walk
from ptilab.paging import entry as e
from tests.conftest import BumpTables

PGD = 0x1000


def test_pte_table_pointing_back_up_at_its_pmd_is_bounded_and_stable():
    b = BumpTables()
    pud, pmd, pte = b.alloc(), b.alloc(), b.alloc()
    b.ram.write_entry(PGD, pud | e.P | e.RW)
    b.ram.write_entry(pud, pmd | e.P | e.RW)
    for i in range(512):
        b.ram.write_entry(pmd + 8 * i, pte | e.P | e.RW)
        b.ram.write_entry(pte + 8 * i, pmd | e.P | e.RW)  # leaves that map the PMD table itself
    first = walk(b.ram, PGD, FOUR_LEVEL)
    again = walk(b.ram, PGD, FOUR_LEVEL)
    assert np.array_equal(first.ranges, again.ranges)
    assert set(np.unique(first.mapped["pa"]).tolist()) == {pmd}
    assert int(first.mapped["size"].sum()) == 1 << 30
    assert list(first.table_refs[3]) == [512]  # one PTE table, decoded once


def test_all_512_pgd_slots_sharing_one_pud_is_walked_once_per_level():
    b = BumpTables()
    pud = b.alloc()
    for i in range(512):
        b.ram.write_entry(PGD + 8 * i, pud | e.P)
    b.ram.write_entry(pud + 8 * 7, 0x4000_0000 | e.P | e.PS)
    w = walk(b.ram, PGD, FOUR_LEVEL)
    assert len(w.mapped) == 512
    assert list(w.tables[1]) == [pud >> 12]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 15), st.integers(0, 511), st.integers(0, (1 << 64) - 1)),
                max_size=60),
       st.sampled_from([FOUR_LEVEL, FIVE_LEVEL]))
def test_random_entries_never_crash_or_hang_the_walker(writes, geometry):
    """16 frames of RAM filled with random entries, often pointing at each other."""
    ram = SimulatedRAM(16 << 12)
    for frame, index, value in writes:
        if value % 3 == 0:
            value = (value & ~e.ADDRESS_MASK) | ((value >> 20) % 20) << 12  # aim at (or just past) our frames
        ram.write_entry(frame * 4096 + 8 * index, value)
    try:
        w = walk(ram, 0, geometry, max_entries=1 << 20)
        ranges = w.ranges  # expanding the aliases has the same budget
    except PtilabError:
        return
    va, size = ranges["va"], ranges["size"]
    assert (va[1:] > va[:-1]).all()  # sorted, one record per address
    assert (va[:-1] + size[:-1] <= va[1:]).all()  # no overlap
    for a in w.anomalies:
        assert a.detail


def _shared_512_ways() -> SimulatedRAM:
    """Every entry of the PGD, PUD and PMD points at the one table below; the
    PTE table maps one kernel-only page 512 times: 2**36 pages in all."""
    ram = SimulatedRAM(8 << 12)
    for table, below in ((1, 2), (2, 3), (3, 4)):
        ram.write_entries(table << 12, np.full(512, (below << 12) | e.P | e.RW | e.US, dtype=np.uint64))
    ram.write_entries(4 << 12, np.full(512, (5 << 12) | e.P | e.RW, dtype=np.uint64))
    return ram


def test_tables_shared_512_ways_walk_in_a_few_records_and_refuse_to_expand():
    w = walk(_shared_512_ways(), PGD, FOUR_LEVEL)
    assert len(w.distinct) == 512 and w.alias_count() == 3 * 511
    assert w.mapped_bytes() == 1 << 48
    runs = w.runs()  # ptdump's view stays small: one run per half
    assert [hex(v) for v in runs["va"]] == ["0x0", "0xffff800000000000"]
    with pytest.raises(WalkTooLarge, match="beyond any real kernel"):
        w.ranges  # 2**36 records: refused before any is made


def test_no_range_crosses_the_non_canonical_hole():
    """1 GiB pages contiguous from PGD slot 255 into slot 256: two ranges, one per half."""
    b = BumpTables()
    low, high = b.alloc(), b.alloc()
    b.ram.write_entry(PGD + 8 * 255, low | e.P | e.RW)
    b.ram.write_entry(PGD + 8 * 256, high | e.P | e.RW)
    b.ram.write_entry(low + 8 * 511, (1 << 30) | e.P | e.RW | e.PS)
    b.ram.write_entry(high, (2 << 30) | e.P | e.RW | e.PS)
    for summarise in (True, False):
        m = walk(b.ram, PGD, FOUR_LEVEL, _summarise=summarise).mapped
        assert [hex(v) for v in m["va"]] == ["0x7fffc0000000", "0xffff800000000000"]
