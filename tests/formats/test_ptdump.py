
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptilab.errors import InputError, UsageError
from ptilab.formats.ptdump import (LINUX_X86_64_MARKERS, Marker, format_prot, format_ranges, format_size,
                                   format_walk, linux_markers, parse_ptdump)
from ptilab.pti import boot
from ptilab.paging import EFF_NX, EFF_RW, FIVE_LEVEL, FOUR_LEVEL, RANGE_DTYPE, walk
from ptilab.paging import entry as e
from ptilab.paging.install import map_page, set_entry
from tests.conftest import BumpTables

PGD = 0x1000
TWO = [Marker(0, "User Space"), Marker(1 << 63, "Kernel Space")]


def _tree(geometry=FOUR_LEVEL):
    b = BumpTables()
    return b, (lambda va, pa, flags, shift=12: map_page(b.ram, geometry, PGD, va, pa, flags, b.alloc, shift,
                                                          table_flags=e.PAGE_TABLE))


@pytest.mark.parametrize("delta, text", [
    (4096, "        4K "), (2 << 20, "        2M "), (1 << 30, "        1G "), (512 << 30, "      512G "),
    (0x1F000, "      124K "), (8 << 40, "        8T "), (0x1001, "     4097B "),
    ((1 << 64) - (1 << 30), "17179869183G "), (0xFFFF_8780_0000_0000, "17179745792G "),
    ((1 << 64) - (1 << 60), "       15E "), (0, "        0E "),
])
def test_sizes_shift_by_1024_while_divisible(delta, text):
    assert format_size(delta) == text


def test_flag_columns_match_printk_prot():
    assert format_prot(e.PAGE_KERNEL_RO, 4) == "    ro                 GLB NX pte"
    assert format_prot(e.P | e.US | e.RW, 4) == "USR RW                     x  pte"
    assert format_prot(e.P | e.PS | e.G, 3) == "    ro         PSE     GLB x  pmd"
    assert format_prot(e.P | e.PS, 4) == "    ro             PAT     x  pte"  # bit 7 is PAT in a pte
    assert format_prot(e.P | e.PS | e.PAT_LARGE, 2) == "    ro         PSE PAT     x  pud"
    assert format_prot(e.P | e.PWT | e.PCD, 4) == "    ro PWT PCD             x  pte"
    assert format_prot(0, 1) == " " * 30 + "p4d"
    assert format_prot(e.PAGE_NONE, 4) == " " * 30 + "pte"


def test_a_hand_built_tree_prints_exactly_what_linux_prints():
    b, m = _tree()
    m(0x400000, 0x200000, e.P | e.US | e.A)
    m(0xFFFF_FFFF_8100_0000, 0x1000000, e.PAGE_KERNEL_LARGE, 21)
    assert format_walk(walk(b.ram, PGD, FOUR_LEVEL)) == """\
---[ User Space ]---
0x0000000000000000-0x0000000000400000           4M                               pmd
0x0000000000400000-0x0000000000401000           4K USR ro                     x  pte
0x0000000000401000-0x0000000000600000        2044K                               pte
0x0000000000600000-0x0000000040000000        1018M                               pmd
0x0000000040000000-0x0000008000000000         511G                               pud
0x0000008000000000-0xffff880000000000   17179745792G                               pgd
---[ Kernel Space ]---
0xffff880000000000-0xffff888000000000         512G                               pgd
---[ LDT remap ]---
0xffff888000000000-0xffff890000000000         512G                               pgd
---[ Low Kernel Mapping ]---
0xffff890000000000-0xffffc90000000000          64T                               pgd
---[ vmalloc() Area ]---
0xffffc90000000000-0xffffea0000000000          33T                               pgd
---[ Vmemmap ]---
0xffffea0000000000-0xfffffe0000000000          20T                               pgd
---[ CPU entry Area ]---
0xfffffe0000000000-0xffffff0000000000           1T                               pgd
---[ ESPfix Area ]---
0xffffff0000000000-0xffffff8000000000         512G                               pgd
0xffffff8000000000-0xffffffef00000000         444G                               pud
---[ EFI Runtime Services ]---
0xffffffef00000000-0xffffffff80000000          66G                               pud
---[ High Kernel Mapping ]---
0xffffffff80000000-0xffffffff81000000          16M                               pmd
0xffffffff81000000-0xffffffff81200000           2M     RW         PSE     GLB NX pmd
0xffffffff81200000-0xffffffffc0000000        1006M                               pmd
---[ Modules ]---
0xffffffffc0000000-0x0000000000000000           1G                               pud
"""


def test_the_top_level_is_pgd_in_both_modes_and_p4d_appears_only_with_five():
    # mm/pagewalk.c real_depth(): with the p4d folded (4-level), a missing p4d is a pgd hole.
    for geometry in (FOUR_LEVEL, FIVE_LEVEL):
        b, m = _tree(geometry)
        m(0x400000, 0x200000, e.P | e.US | e.A)
        lines = format_walk(walk(b.ram, PGD, geometry), TWO).splitlines()
        assert lines[-3].startswith("0x000") and lines[-3].endswith(" pgd")
        assert lines[-1].startswith("0xff") and lines[-1].endswith(" pgd")
        assert (" p4d" in "".join(lines)) == (geometry is FIVE_LEVEL)
    assert lines[-3].startswith("0x0001000000000000-0xff10000000000000")
    assert lines[-4] == "0x0000008000000000-0x0001000000000000      261632G                               p4d"


def test_a_four_level_text_with_a_p4d_top_level_reads_as_depth_0():
    b, m = _tree()
    m(0x400000, 0x200000, e.P | e.US | e.A)
    text = format_walk(walk(b.ram, PGD, FOUR_LEVEL), TWO)
    old = parse_ptdump(text.replace(" pgd\n", " p4d\n"))
    assert (old.ranges == parse_ptdump(text).ranges).all() and old.ranges["level"][-1] == 0


def test_guard_hole_is_never_walked_so_the_user_run_reaches_the_first_kernel_entry():
    b, m = _tree(FIVE_LEVEL)
    m(0x400000, 0x200000, e.P | e.US | e.A)
    text = format_walk(walk(b.ram, PGD, FIVE_LEVEL), TWO)
    assert "0x0001000000000000-0xff10000000000000    16715520T" in text  # ends at GUARD_HOLE_END_ADDR
    assert "---[ Kernel Space ]---\n0xff10000000000000-0x0000000000000000" in text


def test_a_marker_inside_a_run_breaks_it_at_the_first_entry_past_it_one_marker_per_entry():
    b, m = _tree()
    m(0x0, 0x200000, e.P | e.US | e.A)
    markers = [Marker(0, "A"), Marker(0x1800, "B"), Marker(0x2000, "C"), Marker(0x7000, "D")]
    text = format_walk(walk(b.ram, PGD, FOUR_LEVEL), markers)
    assert text.splitlines()[:9] == [
        "---[ A ]---",
        "0x0000000000000000-0x0000000000001000           4K USR ro                     x  pte",
        "0x0000000000001000-0x0000000000002000           4K                               pte",
        "---[ B ]---",  # the pte at 0x2000 is the first entry past 0x1800: B comes there...
        "0x0000000000002000-0x0000000000003000           4K                               pte",
        "---[ C ]---",  # ...and C, though 0x2000 >= C too, must wait for the next entry
        "0x0000000000003000-0x0000000000007000          16K                               pte",
        "---[ D ]---",
        "0x0000000000007000-0x0000000000200000        2020K                               pte",
    ]


def test_espfix_prints_16_lines_then_says_how_many_it_skipped():
    k = boot("linux-6.1", "linux", cpus=1)
    text = format_walk(walk(k.ram, k.user_cr3(), k.geometry), linux_markers(k.geometry))
    body = text.split("---[ ESPfix Area ]---\n")[1].split("---[")[0].splitlines()
    assert len(body) == 17
    assert body[-1].startswith("... ") and body[-1].endswith(" entries skipped ... ")


def test_a_capped_marker_says_entry_for_one_and_nothing_when_the_walk_ends_inside_it():
    b, m = _tree()
    for va in (0x1000, 0x3000):
        m(va, 0x200000, e.P | e.A)
    capped = [Marker(0, "A", 3), Marker(0x4000, "B", 1)]
    text = format_walk(walk(b.ram, PGD, FOUR_LEVEL), capped)
    lines = text.splitlines()
    assert lines[4] == "... 1 entry skipped ... "  # 0x3000-0x4000 was the fourth line under A
    assert lines[5:] == ["---[ B ]---",
                         "0x0000000000004000-0x0000000000200000        2032K                               pte"]
    assert not format_walk(walk(b.ram, PGD, FOUR_LEVEL), [Marker(0, "A", 1)]).count("skipped")


def test_a_protnone_pte_breaks_the_run_but_a_stray_absent_pmd_is_silent():
    b, m = _tree()
    m(0x0, 0x200000, e.P | e.A)
    m(0x2000, 0, e.PAGE_NONE)
    set_entry(b.ram, FOUR_LEVEL, PGD, 0x400000, 2, 0x5000 | e.RW, b.alloc)  # P clear, not zero, no PSE
    lines = format_walk(walk(b.ram, PGD, FOUR_LEVEL), TWO).splitlines()
    assert lines[2:5] == [
        "0x0000000000001000-0x0000000000002000           4K                               pte",
        "0x0000000000002000-0x0000000000003000           4K                               pte",
        "0x0000000000003000-0x0000000000200000        2036K                               pte",
    ]
    # walk_pmd_range() calls ptdump_pmd_entry() for it, which notes nothing: the pmd holes run on over it.
    assert lines[5] == "0x0000000000200000-0x0000000040000000        1022M                               pmd"


def test_an_absent_nonzero_top_entry_prints_like_an_empty_one():
    b, _ = _tree()
    b.ram.write_entry(PGD + 8, 0x8000_0000_0000_0000)
    assert format_walk(walk(b.ram, PGD, FOUR_LEVEL), TWO).splitlines()[1] == \
        "0x0000000000000000-0xffff880000000000    16777096T                               pgd"


def test_kaslr_bases_move_their_markers():
    markers = LINUX_X86_64_MARKERS(FOUR_LEVEL, {"page_offset_base": 0xFFFF_9A00_0000_0000})
    assert [m.start for m in markers if m.name == "Low Kernel Mapping"] == [0xFFFF_9A00_0000_0000]
    five = {m.name: m.start for m in LINUX_X86_64_MARKERS(FIVE_LEVEL)}
    assert five["LDT remap"] == 0xFF10_0000_0000_0000 and five["Low Kernel Mapping"] == 0xFF11_0000_0000_0000
    assert five["CPU entry Area"] == 0xFFFF_FE00_0000_0000 and five["Fixmap Area"] == 0xFFFF_FFFF_FF57_9000
    with pytest.raises(UsageError):
        LINUX_X86_64_MARKERS(FOUR_LEVEL, {"kernel_base": 0})


def alternating_ranges(n: int) -> np.ndarray:
    """n 4 KiB pages from 0, read-only and read-write in turn: n ptdump lines
    (bench/ptdump_text.py times the same input)."""
    r = np.zeros(n, dtype=RANGE_DTYPE)
    r["va"] = np.arange(n, dtype=np.uint64) << np.uint64(12)
    r["size"] = 4096
    r["level"] = 3
    r["prot"] = np.where(np.arange(n) % 2, e.PAGE_KERNEL, e.PAGE_KERNEL_RO).astype(np.uint64)
    r["eff"] = np.where(np.arange(n) % 2, EFF_RW | EFF_NX, EFF_NX)
    return r


def test_65k_alternating_pages_give_one_line_each():
    n = 65536
    lines = format_ranges(alternating_ranges(n), FOUR_LEVEL, TWO).splitlines()
    assert len(lines) == n + 1  # the header, and n runs, the last one up to the flush at 0
    assert lines[1].startswith("0x0000000000000000-0x0000000000001000") and " ro " in lines[1]
    assert lines[2].startswith("0x0000000000001000-0x0000000000002000") and " RW " in lines[2]
    assert lines[-1].startswith(f"0x{(n - 1) << 12:016x}-") and " RW " in lines[-1]


mapping = st.tuples(st.integers(0, (1 << 27) - 1), st.sampled_from([12, 12, 21, 30]),
                    st.sets(st.sampled_from([e.RW, e.US, e.PWT, e.PCD, e.G, e.NX])))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([FOUR_LEVEL, FIVE_LEVEL]), st.lists(mapping, max_size=12), st.booleans())
def test_formatting_what_was_parsed_gives_the_same_bytes(geometry, pages, kernel_half):
    b, m = _tree(geometry)
    taken: list[tuple[int, int]] = []
    for index, shift, flags in pages:
        size = 1 << shift
        va = (index << 12) & ~(size - 1)
        if kernel_half:
            va = geometry.canonical(va | ((1 << geometry.va_bits) - (1 << geometry.shift(0))))  # top slot
        if any(va < s + n and s < va + size for s, n in taken):
            continue
        m(va, (index << 12) & ~(size - 1) & ((1 << 34) - 1), e.P | e.A | sum(flags), shift)
        taken.append((va, size))
    # Lines the ESPfix cap skips are not in the text: the round trip holds without the cap.
    markers = [Marker(m.start, m.name) for m in LINUX_X86_64_MARKERS(geometry)]
    w = walk(b.ram, PGD, geometry)
    text = format_walk(w, markers)
    capped = parse_ptdump(format_walk(w, LINUX_X86_64_MARKERS(geometry)))
    parsed = parse_ptdump(text)
    assert len(capped.ranges) + capped.skipped == len(parsed.ranges)
    assert parsed.geometry == geometry or not kernel_half
    assert len(parsed.ranges) == sum(ln.startswith("0x") for ln in text.splitlines())
    assert format_ranges(parsed.ranges, geometry, markers) == text
    mapped = parsed.ranges[(parsed.ranges["prot"] & np.uint64(e.P)) != 0]
    assert int(mapped["size"].sum()) == sum(n for _, n in taken)


def test_parse_reads_markers_skips_levels_and_rights():
    k = boot("linux-6.1", "linux", cpus=2)
    text = format_walk(walk(k.ram, k.user_cr3(), k.geometry))
    p = parse_ptdump(text, "current_user")
    assert p.geometry == FOUR_LEVEL
    assert [name for _, name in p.markers][:3] == ["User Space", "Kernel Space", "LDT remap"]
    assert p.skipped == int(text.split("... ")[1].split()[0]) and len(p.skips) == 1
    gdt = p.ranges[p.ranges["va"] == np.uint64(0xFFFF_FE00_0000_1000 + 0x3B000)]
    assert len(gdt) == 1 and gdt["level"][0] == 3 and gdt["eff"][0] == EFF_NX  # depth 3 = pte
    assert gdt["prot"][0] == e.P | e.G | e.NX


@pytest.mark.parametrize("bad, why", [
    ("0x00-0x10 4K pte", "not a ptdump line"),
    ("garbage", "not a ptdump line"),
    ("0x0000000000000000-0x0000000000001000   4X  pte", "not a ptdump line"),
    ("0x0000000000000000-0x0000000000001000           8K USR ro                     x  pte", "size 8K does not match"),
    ("0x0000000000000000-0x0000000000001000           4K USR ro     PSE             x  pte", "flag columns"),
    ("0x0000000000000000-0x0000000000001000           4K USR rw                     x  pte", "flag columns"),
    ("... 1 entries skipped ... ", "not a ptdump line"),
])
def test_malformed_ptdump_is_an_input_error_with_the_line(bad, why):
    with pytest.raises(InputError, match=f"current_user:2: {why}"):
        parse_ptdump("---[ User Space ]---\n" + bad, "current_user")


def test_text_without_ranges_is_an_input_error():
    with pytest.raises(InputError, match="no ptdump lines"):
        parse_ptdump("---[ User Space ]---\n")


def test_a_kernel_without_espfix64_has_no_espfix_marker_and_its_run_goes_on():
    b, m = _tree()
    m(0x400000, 0x200000, e.P | e.US | e.A)
    text = format_walk(walk(b.ram, PGD, FOUR_LEVEL), LINUX_X86_64_MARKERS(FOUR_LEVEL, espfix=False))
    assert "ESPfix" not in text
    assert "---[ CPU entry Area ]---\n0xfffffe0000000000-0x0000000000000000           2T " in text
    assert [m.name for m in LINUX_X86_64_MARKERS(FIVE_LEVEL)].count("ESPfix Area") == 1


@pytest.mark.parametrize("cpus", [1, 2, 3])
def test_skipped_lines_count_as_the_espfix_pages_the_kernel_did_not_print(cpus, tmp_path):
    from ptilab.formats.ptdump import read_ptdump, skipped_copies
    from ptilab.linux.profiles import ESPFIX_BASE_ADDR

    k = boot("linux-6.1", "linux", cpus=cpus)
    w = walk(k.ram, k.user_cr3(), k.geometry)
    (tmp_path / "current_user").write_text(format_walk(w, linux_markers(k.geometry)))
    p = read_ptdump(tmp_path / "current_user")
    assert p.skipped > 0
    espfix = (p.ranges["va"] >= np.uint64(ESPFIX_BASE_ADDR)) & (p.ranges["va"] < np.uint64(ESPFIX_BASE_ADDR + (1 << 39)))
    present = espfix & ((p.ranges["prot"] & np.uint64(e.P)) != 0)
    walked = w.ranges_within(ESPFIX_BASE_ADDR, ESPFIX_BASE_ADDR + (1 << 39))
    pages = int(walked["size"][(walked["prot"] & np.uint64(e.P)) != 0].sum()) // 4096
    assert int(skipped_copies(p)[present].sum()) == pages > int(present.sum())


def test_ptilabs_own_simulate_text_reads_as_its_two_titled_views(tmp_path):
    from ptilab.formats.ptdump import read_ptdump_views

    k = boot("linux-6.1", "linux", cpus=1)
    user, kernel = (format_walk(walk(k.ram, cr3, k.geometry)) for cr3 in (k.user_cr3(), k.kernel_cr3()))
    path = tmp_path / "sim.txt"
    path.write_text(f"# current_user: design linux\n{user}# current_kernel: design linux\n{kernel}")
    views = read_ptdump_views(path)
    assert set(views) == {"current_user", "current_kernel"}
    assert len(views["current_user"].ranges) == len(parse_ptdump(user).ranges)
    assert len(views["current_kernel"].ranges) == len(parse_ptdump(kernel).ranges)
    path.write_text(f"# current_user: a\n{user}# current_user: b\n{user}")
    with pytest.raises(InputError, match="a second current_user dump"):
        read_ptdump_views(path)
