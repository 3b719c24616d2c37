"""The batch installs (entry_slots, install_entries, read_entries) against the
one-entry-at-a-time entry_address() they stand for: same tables, made in the
same order, same entries."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptilab.memory.simulated import SimulatedRAM
from ptilab.paging import entry as e
from ptilab.paging.geometry import Geometry
from ptilab.paging.install import (NO_SLOT, LargePageInTheWay, entry_address, install_entries, map_page,
                                   read_entries)

PGD = 0x1000
RAM = 64 << 20


def _ram_and_alloc(first_frame: int = 16):
    ram = SimulatedRAM(RAM)
    made: list[int] = []

    def alloc() -> int:
        pa = (first_frame + len(made)) << e.PAGE_SHIFT
        made.append(pa)
        return pa
    return ram, alloc, made


def _frames(ram: SimulatedRAM) -> dict[int, bytes]:
    return {pfn: ram.read_frame(pfn).tobytes() for pfn in ram.written_frames() if ram.read_frame(pfn).any()}


# Addresses clustered the way a boot's are (runs of pages, a few regions far
# apart), so tables are shared within a batch and already exist across batches.
regions = st.sampled_from([0xFFFF_FE00_0000_0000, 0xFFFF_FE00_0020_0000, 0xFFFF_FE80_4000_0000,
                           0x7FFF_FFE0_0000, 0xFFFF_8880_0000_0000])
runs = st.lists(st.tuples(regions, st.integers(0, 2000), st.integers(1, 600)), min_size=1, max_size=6)


def _vas(batch: list[tuple[int, int, int]]) -> np.ndarray:
    out: list[int] = []
    seen: set[int] = set()
    for base, first, n in batch:
        for page in range(first, first + n):
            va = base + page * e.PAGE_SIZE
            if va not in seen:
                seen.add(va)
                out.append(va)
    return np.array(out, dtype=np.uint64)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(runs, min_size=1, max_size=3), levels=st.sampled_from([4, 5]))
def test_install_entries_is_entry_address_page_by_page(batches, levels):
    g = Geometry(levels)
    batch_ram, batch_alloc, batch_made = _ram_and_alloc()
    one_ram, one_alloc, one_made = _ram_and_alloc()
    for batch in batches:
        vas = _vas(batch)
        values = (vas & np.uint64(0xFFF_F000)) | np.uint64(e.P | e.RW)
        install_entries(batch_ram, g, PGD, vas, values, levels - 1, batch_alloc)
        for va, value in zip(vas.tolist(), values.tolist()):
            one_ram.write_entry(entry_address(one_ram, g, PGD, va, levels - 1, one_alloc), value)
    assert batch_made == one_made  # the same tables, allocated in the same order
    assert _frames(batch_ram) == _frames(one_ram)
    everything = _vas([run for batch in batches for run in batch])
    assert (read_entries(batch_ram, g, PGD, everything, levels - 1)
            == [one_ram.read_entry(entry_address(one_ram, g, PGD, va, levels - 1)) for va in everything.tolist()]).all()


def test_read_entries_is_zero_under_missing_tables():
    g = Geometry(4)
    ram, alloc, _ = _ram_and_alloc()
    va = 0xFFFF_FE00_0000_0000
    map_page(ram, g, PGD, va, 0x5000, e.P | e.RW, alloc)
    vas = np.array([va, va + e.PAGE_SIZE, va + (1 << 21), va + (1 << 39)], dtype=np.uint64)
    assert read_entries(ram, g, PGD, vas, 3).tolist() == [0x5000 | e.P | e.RW, 0, 0, 0]
    from ptilab.paging.install import entry_slots
    slots = entry_slots(ram, g, PGD, vas, 3)
    assert slots[0] != NO_SLOT and slots[1] != NO_SLOT and (slots[2:] == NO_SLOT).all()
    assert ram.written_frames() == sorted(ram.written_frames())  # nothing created on a read
    assert len(ram.written_frames()) == 4


def test_a_large_page_in_the_way_is_refused_as_one_at_a_time():
    g = Geometry(4)
    ram, alloc, _ = _ram_and_alloc()
    base = 0xFFFF_FE00_0000_0000
    map_page(ram, g, PGD, base + (1 << 21), 0x20_0000, e.P | e.RW, alloc, page_shift=21)
    vas = base + (np.arange(1024, dtype=np.uint64) << np.uint64(12))  # runs into the 2 MiB leaf
    with pytest.raises(LargePageInTheWay, match="pmd leaf"):
        install_entries(ram, g, PGD, vas, vas | np.uint64(e.P), 3, alloc)
    with pytest.raises(LargePageInTheWay):
        entry_address(ram, g, PGD, int(vas[-1]), 3, alloc)
