"""compare.viewdiff.diff_views(): what B's user tables expose of the kernel that A's do not."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ptilab.compare.viewdiff import Side, diff_views
from ptilab.linux.regions import label_ranges
from ptilab.paging import EFF_NX, EFF_RW, RANGE_DTYPE, Geometry
from ptilab.paging import entry as e

GEOMETRY = Geometry(4)
# Page slots in four kernel regions: the direct map, vmalloc, the kernel image, the cpu_entry_area.
BASES = (0xFFFF_8880_0000_0000, 0xFFFF_C900_0000_0000, 0xFFFF_FFFF_8100_0000, 0xFFFF_FE00_0000_0000)
SLOTS = 64
RIGHTS = st.tuples(st.booleans(), st.booleans(), st.booleans())  # writable, executable, global
SLOT = st.tuples(st.integers(0, len(BASES) - 1), st.integers(0, SLOTS - 1), st.integers(1, 4), RIGHTS)


def ranges(mappings) -> np.ndarray:
    """Non-overlapping present ranges from (region, slot, pages, rights); a later one overlapping is dropped."""
    taken, rows = set(), []
    for region, slot, pages, rights in mappings:
        pages_used = {(region, slot + i) for i in range(pages)}
        if pages_used & taken:
            continue
        taken |= pages_used
        rows.append((BASES[region] + slot * 4096, pages, rights))
    r = np.zeros(len(rows), RANGE_DTYPE)
    for i, (va, pages, (w, x, g)) in enumerate(sorted(rows)):
        r[i]["va"], r[i]["size"], r[i]["pa"], r[i]["level"] = va, pages * 4096, va & 0xFFF_FFFF, 3
        r[i]["prot"] = e.P | (e.RW if w else 0) | (e.G if g else 0) | (0 if x else e.NX)
        r[i]["eff"] = (EFF_RW if w else 0) | (0 if x else EFF_NX)
    return r


def side(r: np.ndarray, name: str = "view") -> Side:
    return Side(name, GEOMETRY, r)


@settings(max_examples=150, deadline=None)
@given(st.lists(SLOT, max_size=12))
def test_a_view_against_itself_differs_in_nothing(mappings):
    r = ranges(mappings)
    d = diff_views(side(r), side(r.copy()))
    assert (d.exposed, d.moved, d.gone) == ([], [], []) and not d.exposes_more


@settings(max_examples=150, deadline=None)
@given(st.lists(SLOT, max_size=12), SLOT)
def test_adding_a_mapping_to_b_shows_exactly_it(mappings, added):
    a = ranges(mappings)
    b = ranges([*mappings, added])
    if len(b) == len(a):
        return  # it overlapped one already there
    (new,) = [row for row in b.tolist() if row not in a.tolist()]
    d = diff_views(side(a), side(b))
    assert not d.moved and not d.gone
    # One change, or one per name where the range spans several (cpu_entry_area pieces).
    r, _, names = label_ranges(b, None, GEOMETRY)
    inside = (r["va"] >= np.uint64(new[0])) & (r["va"] < np.uint64(new[0] + new[1]))
    assert {c.kind for c in d.exposed} == {"new"}
    assert min(c.va for c in d.exposed) == new[0] and sum(c.pages for c in d.exposed) == new[1] // 4096
    assert {c.region for c in d.exposed} == set(names[inside].tolist())


@settings(max_examples=100, deadline=None)
@given(st.lists(SLOT, min_size=1, max_size=12), st.data())
def test_widening_one_range_shows_exactly_that_widening(mappings, data):
    a = ranges(mappings)
    i = data.draw(st.integers(0, len(a) - 1))
    b = a.copy()
    if not b[i]["eff"] & EFF_RW:
        b[i]["eff"] |= EFF_RW
        b[i]["prot"] |= np.uint64(e.RW)
    elif b[i]["eff"] & EFF_NX:
        b[i]["eff"] &= 0xFF & ~EFF_NX  # make it executable
        b[i]["prot"] &= ~np.uint64(e.NX)
    elif not b[i]["prot"] & np.uint64(e.G):
        b[i]["prot"] |= np.uint64(e.G)
    else:
        return  # every right already
    d = diff_views(side(a), side(b))
    # One change, or one per name where the range spans several (cpu_entry_area pieces).
    assert {c.kind for c in d.exposed} == {"widened"}
    assert min(c.va for c in d.exposed) == int(a[i]["va"])
    assert sum(c.pages for c in d.exposed) == int(a[i]["size"]) // 4096
    assert not d.gone and not d.moved
    # ... and the other way round, it is a narrowing: B exposes nothing more.
    back = diff_views(side(b), side(a))
    assert not back.exposes_more and {c.kind for c in back.gone} == {"narrowed"}
    assert len(back.gone) == len(d.exposed)


def test_a_region_that_slid_with_the_same_shape_is_a_move():
    a = ranges([(2, 0, 4, (False, True, True)), (2, 8, 2, (False, False, True))])
    b = a.copy()
    b["va"] += np.uint64(0x3A00000)  # a KASLR slide: 2 MiB steps
    d = diff_views(side(a), side(b))
    assert not d.exposes_more and not d.gone
    assert {(c.region, c.shift) for c in d.moved} == {("entry text", 0x3A00000)}


def test_a_moved_region_with_a_page_more_shows_the_surplus_as_new():
    a = ranges([(1, 0, 2, (True, False, True))])
    b = ranges([(1, 16, 3, (True, False, True))])
    d = diff_views(side(a), side(b))
    assert [(c.kind, c.region, c.pages) for c in d.exposed] == [("new", "vmalloc", 1)]
    assert [(c.kind, c.pages, c.shift) for c in d.moved] == [("moved", 2, None)]


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    import subprocess
    import sys

    text = tmp_path / "notes.txt"
    text.write_text("not a ptdump\n")
    for args in (["model:linux-6.1"], ["model:linux-6.1:linux", "model:nope:linux"],
                 ["model:linux-6.1:linux", "model:linux-6.1:linux:0"], ["model:linux-6.1:linux", str(text)],
                 ["model:linux-6.1:linux", "model:linux-6.1:linux", "--cr3-a", "1000"],
                 ["model:linux-6.1:linux", str(tmp_path / "missing.core")]):
        done = subprocess.run([sys.executable, "-m", "ptilab.cli", "diff", *args], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 2 and not done.stdout, (args, done.stdout)
        assert done.stderr.startswith("ptilab: error: ") and done.stderr.count("\n") == 1, (args, done.stderr)


def test_widening_two_cpu_entry_area_pages_is_one_change_per_piece():
    # The first two pages of CPU 0's area are its GDT and its entry stack page: two names, two changes.
    a = ranges([(3, 0, 2, (False, False, False))])
    b = a.copy()
    b[0]["eff"] |= EFF_RW
    b[0]["prot"] |= np.uint64(e.RW)
    d = diff_views(side(a), side(b))
    assert [(c.kind, c.pages) for c in d.exposed] == [("widened", 1), ("widened", 1)]
    assert len({c.region for c in d.exposed}) == 2
