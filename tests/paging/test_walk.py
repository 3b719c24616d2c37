import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ptilab.errors import FrameOutsideMemory, WalkTooLarge
from ptilab.paging import EFF_NX, EFF_RW, EFF_US, FIVE_LEVEL, FOUR_LEVEL, PageFault, translate, walk
from ptilab.paging import entry as e
from ptilab.paging.install import map_page, set_entry
from ptilab.memory.simulated import SimulatedRAM
from ptilab.paging import RANGE_DTYPE, coalesce
from tests.conftest import BumpTables

PGD = 0x1000
FLAG_BITS = [e.RW, e.US, e.PWT, e.PCD, e.G, e.NX]

mapping = st.tuples(
    st.integers(0, (1 << 36) - 1),  # page index (4K units) within the 48-bit space
    st.sampled_from([12, 21, 30]),
    st.integers(0, (1 << 20) - 1),  # physical frame index, scaled below
    st.lists(st.sampled_from(FLAG_BITS), unique=True),
)


def _build(geometry, pages):
    """Map pages, skipping those that overlap one already mapped; returns what stuck."""
    bump = BumpTables(size=1 << 34)
    taken = []
    done = []
    for index, shift, frame, flag_list in pages:
        size = 1 << shift
        va = ((index << 12) & ~(size - 1)) & ((1 << geometry.va_bits) - 1)
        if any(va < b + s and b < va + size for b, s in taken):
            continue
        pa = (frame << 12) & ~(size - 1) & ((1 << 33) - 1)
        flags = e.P | e.A
        for f in flag_list:
            flags |= f
        map_page(bump.ram, geometry, PGD, geometry.canonical(va), pa, flags, bump.alloc, shift,
                 table_flags=e.PAGE_TABLE)
        taken.append((va, size))
        done.append((geometry.canonical(va), pa, size, flags))
    return bump, done


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mapping, min_size=1, max_size=12), st.sampled_from([FOUR_LEVEL, FIVE_LEVEL]))
def test_translate_after_map_gives_back_frame_and_rights(pages, geometry):
    bump, done = _build(geometry, pages)
    for va, pa, size, flags in done:
        t = translate(bump.ram, PGD, va + size - 8, geometry)
        assert t.pa == pa + size - 8
        assert t.page_size == size
        assert t.writable == bool(flags & e.RW)
        assert t.user == bool(flags & e.US)
        assert t.executable == (not flags & e.NX)
        assert t.global_ == bool(flags & e.G)
        assert len(t.reads) == geometry.levels - (size.bit_length() - 13) // 9


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mapping, min_size=1, max_size=12), st.sampled_from([FOUR_LEVEL, FIVE_LEVEL]))
def test_walk_lists_exactly_what_was_mapped(pages, geometry):
    bump, done = _build(geometry, pages)
    w = walk(bump.ram, PGD, geometry)
    pages_seen = {}
    for r in w.mapped:
        for off in range(0, int(r["size"]), 0x1000):
            pages_seen[(int(r["va"]) + off) & 0xFFFF_FFFF_FFFF_FFFF] = (int(r["pa"]) + off, int(r["eff"]))
    expected = {}
    for va, pa, size, flags in done:
        eff = (EFF_RW if flags & e.RW else 0) | (EFF_US if flags & e.US else 0) | (EFF_NX if flags & e.NX else 0)
        for off in range(0, size, 0x1000):
            expected[va + off] = (pa + off, eff)
    assert pages_seen == expected
    # ranges tile without overlap and are sorted
    va = w.ranges["va"].astype(object)
    ends = [int(a) + int(s) for a, s in zip(w.ranges["va"], w.ranges["size"])]
    assert all(ends[i] <= int(va[i + 1]) or int(va[i + 1]) < int(va[i]) for i in range(len(va) - 1))


@given(st.lists(st.tuples(st.booleans(), st.booleans(), st.booleans()), min_size=4, max_size=4))
def test_effective_rights_follow_the_sdm_at_every_level(bits):
    bump = BumpTables()
    g = FOUR_LEVEL
    va = 0x7F12_3456_7000
    table = PGD
    for depth, (rw, us, nx) in enumerate(bits):
        value = e.P | (e.RW if rw else 0) | (e.US if us else 0) | (e.NX if nx else 0)
        nxt = bump.alloc() if depth < 3 else 0x4242000
        bump.ram.write_entry(table + 8 * g.index(va, depth), nxt | value)
        table = nxt
    t = translate(bump.ram, PGD, va, g)
    assert t.writable == all(b[0] for b in bits)
    assert t.user == all(b[1] for b in bits)
    assert t.executable == (not any(b[2] for b in bits))
    (r,) = walk(bump.ram, PGD, g).mapped
    assert bool(r["eff"] & EFF_RW) == t.writable
    assert bool(r["eff"] & EFF_US) == t.user
    assert bool(r["eff"] & EFF_NX) == (not t.executable)


def test_not_present_faults_with_the_entries_read(bump):
    map_page(bump.ram, FOUR_LEVEL, PGD, 0x400000, 0x200000, e.P | e.RW, bump.alloc)
    with pytest.raises(PageFault) as info:
        translate(bump.ram, PGD, 0x600000, FOUR_LEVEL)
    assert [r.level for r in info.value.reads] == ["pgd", "pud", "pmd"]


def test_ps_in_a_pgd_entry_is_reserved_and_not_followed(bump):
    bump.ram.write_entry(PGD, 0x40000000 | e.P | e.PS)
    with pytest.raises(PageFault) as info:
        translate(bump.ram, PGD, 0, FOUR_LEVEL)
    assert info.value.reserved
    w = walk(bump.ram, PGD, FOUR_LEVEL)
    assert len(w.mapped) == 0
    assert [a.kind for a in w.anomalies] == ["reserved-bits"]


def test_self_referencing_table_is_bounded_and_named(bump):
    bump.ram.write_entry(PGD, PGD | e.P | e.RW)  # pgd[0] -> pgd itself
    w = walk(bump.ram, PGD, FOUR_LEVEL)
    assert any(a.kind == "table-at-several-levels" for a in w.anomalies)
    # pgd[0] seen as a pte table maps the pgd frame itself at va 0
    assert int(w.mapped[0]["pa"]) == PGD


def test_one_table_shared_512_ways_is_read_once(bump):
    pud = bump.alloc()
    for i in range(256):
        bump.ram.write_entry(PGD + 8 * i, pud | e.P | e.RW)
    bump.ram.write_entry(pud, 0x40000000 | e.P | e.PS)
    w = walk(bump.ram, PGD, FOUR_LEVEL)
    assert list(w.tables[1]) == [pud >> 12]
    assert list(w.table_refs[1]) == [256]
    assert len(w.mapped) == 256  # one 1 GiB alias per pgd slot, not coalesced (same frame)


def test_aliasing_beyond_budget_is_walked_once_but_not_expanded(bump):
    pud, pmd = bump.alloc(), bump.alloc()
    for i in range(512):
        bump.ram.write_entry(PGD + 8 * i, pud | e.P)
        bump.ram.write_entry(pud + 8 * i, pmd | e.P)
        bump.ram.write_entry(pmd + 8 * i, pmd | e.P)
    w = walk(bump.ram, PGD, FOUR_LEVEL, max_entries=1 << 24)  # each shared table decoded once
    assert len(w.distinct) <= 512 and w.alias_count() == 3 * 511
    assert w.expanded_records() == 512 ** 4
    assert w.mapped_bytes() == 1 << 48
    with pytest.raises(WalkTooLarge):
        w.ranges


def test_table_past_end_of_memory_is_an_anomaly(bump):
    bump.ram.write_entry(PGD, (1 << 40) | e.P)
    w = walk(bump.ram, PGD, FOUR_LEVEL)
    assert [a.kind for a in w.anomalies] == ["table-outside-memory"]


def test_cr3_outside_memory_is_a_clear_error(bump):
    with pytest.raises(FrameOutsideMemory):
        walk(bump.ram, 1 << 40, FOUR_LEVEL)


# -- aliased subtrees: summarised by the walker, expanded exactly on demand --------------

TABLES_PER_DEPTH = 3
SHARED_FLAGS = st.sampled_from([0, e.RW, e.US, e.RW | e.US, e.NX, e.RW | e.NX, e.G | e.RW | e.US])


@st.composite
def shared_tree(draw):
    """A small RAM whose tables point at each other heavily: every table of
    a depth comes from a pool of 3, entries are written in strided runs of
    one value, so a table is reached from many slots, with mixed rights,
    holes, large pages, contiguous runs of leaves and reserved bits."""
    geometry = draw(st.sampled_from([FOUR_LEVEL, FIVE_LEVEL]))
    levels = geometry.levels
    frame = iter(range(1, 1 + levels * TABLES_PER_DEPTH))
    pool = [[0x1000 * next(frame) for _ in range(1 if d == 0 else TABLES_PER_DEPTH)] for d in range(levels)]
    ram = SimulatedRAM(0x1000 * (2 + levels * TABLES_PER_DEPTH))
    for depth in range(levels):
        for table in pool[depth]:
            for _ in range(draw(st.integers(0, 5))):
                kind = draw(st.sampled_from(["ref", "ref", "ref", "leaf", "junk", "reserved", "run"]))
                flags = draw(SHARED_FLAGS)
                shift = geometry.shift(depth)
                if kind == "run" and depth == levels - 1:
                    base = draw(st.integers(0, 1 << 16)) << 12
                    for i in range(512):
                        ram.write_entry(table + 8 * i, (base + (i << 12)) | flags | e.P)
                    continue
                if depth < levels - 1 and kind in ("ref", "reserved", "run"):
                    value = draw(st.sampled_from(pool[depth + 1])) | flags | e.P
                    if kind == "reserved":
                        value |= 1 << 45  # above the walk's MAXPHYADDR of 40
                elif kind == "leaf" or kind == "run":
                    if depth != levels - 1 and not geometry.leaf_allowed(depth):
                        continue
                    value = (draw(st.integers(0, 1 << 8)) << shift) | flags | e.P
                    if depth != levels - 1:
                        value |= e.PS | (draw(st.sampled_from([0, 0, 0, 1 << 13])))  # sometimes bad low bits
                else:
                    value = draw(st.integers(1, 1 << 20)) << 1  # not present, not zero
                start = draw(st.integers(0, 511))
                stride = draw(st.sampled_from([1, 1, 2, 16, 64]))
                count = draw(st.integers(1, 64 if depth >= levels - 2 else 8))
                for i in range(start, min(512, start + stride * count), stride):
                    ram.write_entry(table + 8 * i, value)
    return ram, pool[0][0], geometry


def _reference(ram, cr3, geometry, **kw):
    return walk(ram, cr3, geometry, maxphyaddr=40, _summarise=False, **kw)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(shared_tree())
def test_summarised_walk_expands_to_exactly_the_full_walk(tree):
    ram, cr3, geometry = tree
    try:
        full = _reference(ram, cr3, geometry, max_entries=1 << 20)
    except WalkTooLarge:
        assume(False)
    w = walk(ram, cr3, geometry, maxphyaddr=40)
    assert np.array_equal(w.ranges, full.ranges)
    assert [t.tolist() for t in w.tables] == [t.tolist() for t in full.tables]
    assert [r.tolist() for r in w.table_refs] == [r.tolist() for r in full.table_refs]
    assert w.anomalies == full.anomalies
    kernel_half = _reference(ram, cr3, geometry, top_slots=(256, 512)).all_table_frames()
    assert np.array_equal(w.kernel_half_table_frames(), kernel_half)
    assert w.mapped_bytes() == full.mapped_bytes() == int(full.mapped["size"].sum())
    assert w.expanded_records() >= len(full.ranges)
    assert np.array_equal(w.runs(), coalesce(full.ranges, by_pa=False))
    # Counting by address window without expanding agrees with the expansion.
    edges = [1 << 21, 1 << 39, geometry.kernel_half_start(), 0xFFFF_FFFF_8000_0000]
    by_bin = w.multiplicity(edges)
    assert by_bin.sum() == w.expanded_records()
    assert np.array_equal(by_bin, w._multiplicity_by_expanding(np.array(edges, np.uint64)))
    lo, hi = 1 << 30, 3 << 39
    window = w.ranges_within(lo, hi)
    assert _pages(window, lo, hi) == _pages(full.ranges, lo, hi)


def _pages(r, lo, hi):
    """Every present 4 KiB page in [lo, hi) as (va, pa, eff, prot)."""
    out = set()
    for va, size, pa, prot, eff in zip(*(r[f].tolist() for f in ("va", "size", "pa", "prot", "eff"))):
        if prot & e.P:
            for off in range(max(va, lo) - va, min(va + size, hi) - va, 0x1000):
                out.add((va + off, pa + off, eff, prot))
    return out


def test_espfix_of_8192_cpus_is_summarised_not_expanded():
    """espfix_64.c: 64 stacks per page, so 128 pages; each PTE table holds
    16 of them every 64 KiB (32 clones each), all 512 entries of a PMD table
    point at that PTE table and 4 PUD entries at the PMD table: each page
    appears 32 * 512 * 4 = 65536 times."""
    from ptilab.pti import boot
    from ptilab.linux.profiles import ESPFIX_BASE_ADDR

    k = boot("linux-6.1", "linux", cpus=8192, levels=5)
    w = walk(k.ram, k.user_cr3(), k.geometry)
    groups = 8192 // 64 // 16
    espfix = (w.aliases["va"] >= np.uint64(ESPFIX_BASE_ADDR)) & (w.aliases["va"] < np.uint64(ESPFIX_BASE_ADDR + (1 << 39)))
    assert int(espfix.sum()) == groups * (3 + 511) == w.alias_count()
    # The cpu_entry_area's per-CPU pages are distinct (about 135000 records); espfix adds 4096.
    assert len(w.distinct) < 200_000 < 128 * 65536 <= w.expanded_records()
    assert w._ranges is None  # nothing above expanded
    inside = (w.distinct["va"] >= np.uint64(ESPFIX_BASE_ADDR)) & \
        (w.distinct["va"] < np.uint64(ESPFIX_BASE_ADDR + (1 << 39)))
    present = inside & ((w.distinct["prot"] & np.uint64(e.P)) != 0)
    assert int((w.distinct["size"][present] * w.multiplicity()[present]).sum()) == 128 * 65536 * 4096
    assert len(np.unique(w.distinct["pa"][present])) == 128


def test_split_at_cuts_inside_ranges_only_and_keeps_frames_even_at_the_top():
    from ptilab.paging import split_at

    r = np.zeros(2, RANGE_DTYPE)
    r["va"] = [0xFFFF_FFFF_8100_0000, 0xFFFF_FFFF_FF00_0000]
    r["size"] = [16 << 20, 16 << 20]  # the second ends at 2**64
    r["pa"], r["prot"] = [0x100_0000, 0x900_0000], e.P
    cuts = np.array([0xFFFF_FFFF_8100_0000, 0xFFFF_FFFF_81C0_0000, 0xFFFF_FFFF_FF80_0000], dtype=np.uint64)
    out, origin = split_at(r, cuts)
    assert [hex(v) for v in out["va"]] == ["0xffffffff81000000", "0xffffffff81c00000",
                                           "0xffffffffff000000", "0xffffffffff800000"]
    assert origin.tolist() == [0, 0, 1, 1]
    assert out["size"].tolist() == [12 << 20, 4 << 20, 8 << 20, 8 << 20]
    assert out["pa"].tolist() == [0x100_0000, 0x1C0_0000, 0x900_0000, 0x980_0000]
