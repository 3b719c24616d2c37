"""Adversarial tables: every walk stays bounded, names the anomaly, and repeats itself."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptilab.errors import PtilabError
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
