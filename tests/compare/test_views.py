"""compare.views.diff(): runs of pages where the user view and the kernel's differ."""

from hypothesis import given, settings
from hypothesis import strategies as st

from ptilab.compare.views import diff, rights
from ptilab.paging import EFF_NX, EFF_RW, FOUR_LEVEL, walk
from ptilab.paging import entry as e
from ptilab.paging.install import map_page
from tests.conftest import BumpTables

BASE = 0xFFFF_FE00_0000_0000  # the cpu_entry_area's address: a window the diff is asked about
SLOTS = 40  # the window's pages; a PTE table is 512, so runs cross no table edge here but meet holes
USER_PGD, KERNEL_PGD = 0x1000, 0x2000

PAGE = st.tuples(st.booleans(), st.integers(0, 3), st.sampled_from([0, e.RW, e.NX, e.RW | e.NX]))
VIEW = st.lists(PAGE, min_size=SLOTS, max_size=SLOTS)  # (mapped, frame, rights) per page


def _views(user: list, kernel: list):
    bump = BumpTables()
    for pgd, pages in ((USER_PGD, user), (KERNEL_PGD, kernel)):
        for i, (mapped, frame, flags) in enumerate(pages):
            if mapped:
                map_page(bump.ram, FOUR_LEVEL, pgd, BASE + i * 4096, 0x4000_0000 + frame * 4096,
                         e.P | e.A | flags, bump.alloc)
    return walk(bump.ram, USER_PGD, FOUR_LEVEL), walk(bump.ram, KERNEL_PGD, FOUR_LEVEL)


def _page_by_page(user: list, kernel: list) -> list[tuple[int, str, str, str]]:
    """The reference: each page's divergence, judged on its own."""
    def shown(page):
        mapped, _, flags = page
        return rights((EFF_RW if flags & e.RW else 0) | (EFF_NX if flags & e.NX else 0)) if mapped else "-"
    out = []
    for i, (u, k) in enumerate(zip(user, kernel)):
        kind = ("missing in user view" if k[0] and not u[0] else "only in user view" if u[0] and not k[0] else
                "rights differ" if u[0] and u[2] != k[2] else "frame differs" if u[0] and u[1] != k[1] else "")
        if kind:
            out.append((BASE + i * 4096, kind, shown(u), shown(k)))
    return out


@settings(max_examples=150, deadline=None)
@given(VIEW, VIEW)
def test_the_runs_are_the_page_by_page_divergences_joined_where_nothing_changes(user, kernel):
    u, k = _views(user, kernel)
    runs = diff(u, k, BASE, BASE + SLOTS * 4096)
    expanded = [(d.va + i * 4096, d.kind, d.user, d.kernel) for d in runs for i in range(d.pages)]
    assert expanded == _page_by_page(user, kernel)
    for a, b in zip(runs, runs[1:]):  # maximal: two neighbours could not have been one run
        assert a.va + a.pages * 4096 != b.va or (a.kind, a.user, a.kernel) != (b.kind, b.user, b.kernel)


def test_identical_views_do_not_diverge():
    pages = [(True, i % 4, e.RW | e.NX) for i in range(SLOTS)]
    u, k = _views(pages, pages)
    assert diff(u, k, BASE, BASE + SLOTS * 4096) == []


@settings(max_examples=60, deadline=None)
@given(VIEW, st.sampled_from([0, e.RW, e.NX, e.RW | e.NX]))
def test_a_large_page_is_judged_page_by_page_too(user, flags):
    """The kernel maps the window with one 2 MiB leaf (frame i at page i), the
    user view with 4 KiB pages: the runs still split where each page's verdict does."""
    u, _ = _views(user, [])
    bump = BumpTables()
    map_page(bump.ram, FOUR_LEVEL, KERNEL_PGD, BASE, 0x4000_0000, e.P | e.A | flags, bump.alloc, page_shift=21)
    k = walk(bump.ram, KERNEL_PGD, FOUR_LEVEL)
    runs = diff(u, k, BASE, BASE + SLOTS * 4096)
    expanded = [(d.va + i * 4096, d.kind, d.user, d.kernel) for d in runs for i in range(d.pages)]
    assert expanded == _page_by_page(user, [(True, i, flags) for i in range(SLOTS)])
