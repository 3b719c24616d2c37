import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptilab.errors import InputError
from ptilab.formats.ptdump import Marker, _prot, _size, format_walk, linux_markers, parse_ptdump
from ptilab.linux.kernel import boot
from ptilab.paging import FOUR_LEVEL, walk
from ptilab.paging import entry as e
from ptilab.paging.install import map_page
from tests.conftest import BumpTables


@pytest.mark.parametrize("delta, text", [
    (4096, "        4K "), (2 << 20, "        2M "), (1 << 30, "        1G "), (512 << 30, "      512G "),
    (0x1F000, "      124K "), (8 << 40, "        8T "), (3 * 4096 + 0, "       12K "),
])
def test_sizes_shift_by_1024_while_divisible(delta, text):
    assert _size(delta) == text


def test_flag_columns_match_printk_prot():
    assert _prot(e.PAGE_KERNEL_RO, 4) == "    ro                 GLB NX pte"
    assert _prot(e.P | e.US | e.RW, 4) == "USR RW                     x  pte"
    assert _prot(e.P | e.PS | e.G, 3) == "    ro         PSE     GLB x  pmd"
    assert _prot(e.P | e.PS, 4) == "    ro             PAT     x  pte"  # bit 7 is PAT in a PTE
    assert _prot(0, 1) == " " * 30 + "p4d"


def test_a_hand_built_tree_prints_exactly():
    b = BumpTables()
    map_page(b.ram, FOUR_LEVEL, 0x1000, 0x400000, 0x200000, e.P | e.US | e.A, b.alloc, table_flags=e.PAGE_TABLE)
    text = format_walk(walk(b.ram, 0x1000, FOUR_LEVEL), [Marker(0, "User Space"), Marker(1 << 63, "Kernel Space")])
    assert text.splitlines()[:4] == [
        "---[ User Space ]---",
        "0x0000000000000000-0x0000000000400000           4M                               pmd",
        "0x0000000000400000-0x0000000000401000           4K USR ro                     x  pte",
        "0x0000000000401000-0x0000000000600000        2044K                               pte",
    ]


def test_espfix_prints_16_lines_then_says_how_many_it_skipped():
    k = boot("linux-6.1", "linux", cpus=1)
    text = format_walk(walk(k.ram, k.user_cr3(), k.geometry), linux_markers(k.geometry))
    body = text.split("---[ ESPfix Area ]---\n")[1].split("---[")[0].splitlines()
    assert len(body) == 17
    assert body[-1].startswith("... ") and body[-1].endswith(" entries skipped ... ")


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(["linux", "mirror", "explicit"]), st.integers(1, 5), st.sampled_from([4, 5]))
def test_parse_after_format_gives_back_every_run(design, cpus, levels):
    k = boot("linux-6.1", design, cpus=cpus, levels=levels)
    text = format_walk(walk(k.ram, k.user_cr3(), k.geometry), linux_markers(k.geometry))
    parsed = parse_ptdump(text)
    lines = [ln for ln in text.splitlines() if ln.startswith("0x")]
    assert len(parsed.ranges) == len(lines)
    assert [m for _, m in parsed.markers][:2] == ["User Space", "Kernel Space"]
    present = parsed.ranges[(parsed.ranges["prot"] & np.uint64(e.P)) != 0]
    cea = present[(present["va"] >= np.uint64(0xFFFFFE0000000000)) & (present["va"] < np.uint64(0xFFFFFE8000000000))]
    assert len(cea) and all(int(p) & e.NX for p in cea["prot"])  # every piece of the area is NX
    original = walk(k.ram, k.user_cr3(), k.geometry).mapped
    assert int(present["size"].sum()) <= int(original["size"].sum())  # espfix lines past 16 are skipped


@pytest.mark.parametrize("bad", ["0x00-0x10 4K pte", "garbage", "0x0000000000000000-0x0000000000001000   4X  pte"])
def test_malformed_ptdump_is_an_input_error_with_the_line(bad):
    with pytest.raises(InputError, match=":1: not a ptdump line"):
        parse_ptdump(bad)
