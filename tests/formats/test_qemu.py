import json
from pathlib import Path

import numpy as np
import pytest

from ptilab.errors import InputError
from ptilab.formats.qemu import (format_info_mem, format_info_tlb, format_parsed_info_mem, parse_info_mem,
                                 parse_info_tlb)
from ptilab.paging import FIVE_LEVEL, FOUR_LEVEL, walk
from ptilab.paging import entry as e
from ptilab.paging.install import map_page, set_entry
from tests.conftest import BumpTables

PGD = 0x1000
REAL = Path(__file__).resolve().parents[1] / "realkernel" / "out"


def _tree(geometry=FOUR_LEVEL, table_flags=e.PAGE_TABLE):
    b = BumpTables()
    return b, (lambda va, pa, flags, shift=12: map_page(b.ram, geometry, PGD, va, pa, flags, b.alloc, shift,
                                                          table_flags=table_flags))


def test_info_mem_merges_equal_rights_across_levels_and_frames_and_ignores_nx():
    b, m = _tree()
    m(0x200000, 0x4000000, e.P | e.US | e.A, 21)
    m(0x400000, 0x123000, e.P | e.US | e.NX | e.A)  # another level, another frame, NX: same run
    m(0x401000, 0x9000, e.P | e.US | e.RW | e.A)
    m(0x403000, 0xA000, e.P | e.US | e.RW | e.A)  # a hole at 0x402000 ends the run
    m(0xFFFF_FFFF_FFFF_F000, 0xB000, e.PAGE_KERNEL)  # the last page: the run ends at the flush, 1 << 48
    assert format_info_mem(walk(b.ram, PGD, FOUR_LEVEL)) == (
        "0000000000200000-0000000000401000 0000000000201000 ur-\n"
        "0000000000401000-0000000000402000 0000000000001000 urw\n"
        "0000000000403000-0000000000404000 0000000000001000 urw\n"
        "fffffffffffff000-0001000000000000 0000000000001000 -rw\n")


def test_info_mem_rights_are_anded_down_the_levels():
    b, m = _tree(table_flags=e.KERNPG_TABLE)  # upper entries without US
    m(0x400000, 0x9000, e.P | e.US | e.RW | e.A)
    assert format_info_mem(walk(b.ram, PGD, FOUR_LEVEL)) == \
        "0000000000400000-0000000000401000 0000000000001000 -rw\n"


def test_info_tlb_prints_each_page_with_its_own_bits_and_p_only_for_large_pages():
    b, m = _tree()
    m(0x400000, 0x9000, e.P | e.US | e.A | e.PAT_4K)  # a pte's bit 7 is PAT: QEMU clears it
    m(0xFFFF_8880_0020_0000, 0x4_0000_0020_0000, e.PAGE_KERNEL_LARGE | e.PAT_LARGE, 21)  # bit 50 is past QEMU's mask
    m(0xFFFF_FFFF_8000_0000, 0x4000_0000, e.P | e.G | e.A | e.PWT | e.PCD, 30)
    assert format_info_tlb(walk(b.ram, PGD, FOUR_LEVEL)) == (
        "0000000000400000: 0000000000009000 ----A--U-\n"
        "ffff888000200000: 0000000000200000 XGPDA---W\n"
        "ffffffff80000000: 0000000040000000 -GP-ACT--\n")


def test_info_tlb_counts_every_page_of_a_run():
    b, m = _tree()
    for i in range(3):
        m(0x400000 + (i << 12), 0x9000 + (i << 12), e.P | e.RW | e.A)
    lines = format_info_tlb(walk(b.ram, PGD, FOUR_LEVEL)).splitlines()
    assert lines == [f"{0x400000 + (i << 12):016x}: {0x9000 + (i << 12):016x} ----A---W" for i in range(3)]


def test_la57_info_mem_is_what_qemu_7_2_prints_or_what_it_meant():
    b, m = _tree(FIVE_LEVEL)
    m(0x400000, 0x9000, e.P | e.US | e.A)
    m(0xFF11_0000_0000_0000, 0x200000, e.PAGE_KERNEL_LARGE, 21)
    w = walk(b.ram, PGD, FIVE_LEVEL)
    assert format_info_mem(w) == ""  # mem_info_la57's inverted present tests see nothing on sane tables
    assert format_info_mem(w, qemu_la57_bug=False) == (
        "0000000000400000-0000000000401000 0000000000001000 ur-\n"
        "ff11000000000000-ff11000000200000 0000000000200000 -rw\n")
    set_entry(b.ram, FIVE_LEVEL, PGD, 0x8000_0000, 2, e.PS | e.US | e.RW, b.alloc, table_flags=e.PAGE_TABLE)
    assert format_info_mem(walk(b.ram, PGD, FIVE_LEVEL)) == \
        "0000000080000000-00000000c0000000 0000000040000000 urw\n"


def test_info_text_parses_and_prints_back():
    text = ("0000000000400000-00000000004f0000 00000000000f0000 ur-\n"
            "ffffffff81000000-ffffffff81200000 0000000000200000 -rw\n")
    rows = parse_info_mem(text)
    assert rows[1] == (0xFFFF_FFFF_8100_0000, 0xFFFF_FFFF_8120_0000, 0x200000, "-rw")
    assert format_parsed_info_mem(rows) == text
    tlb = parse_info_tlb("0000000000400000: 000000000330d000 X---A--U-\n")
    assert tlb["va"][0] == 0x400000 and tlb["pa"][0] == 0x330D000 and tlb["flags"][0] == "X---A--U-"


@pytest.mark.parametrize("parse, bad", [
    (parse_info_mem, "0000000000400000-00000000004f0000 00000000000f0000 urx"),
    (parse_info_mem, "400000-4f0000 f0000 ur-"),
    (parse_info_tlb, "0000000000400000: 000000000330d000 X---A--U"),
    (parse_info_tlb, "0000000000400000 000000000330d000 X---A--U-"),
])
def test_malformed_monitor_text_is_an_input_error_with_the_line(parse, bad):
    with pytest.raises(InputError, match=r":2: not '"):
        parse("\n" + bad + "\n")


def _real(config: str) -> Path:
    """The fixture's directory, built on demand (skipped where it cannot be built; failed in CI)."""
    from tests.realkernel.conftest import real_kernel
    return real_kernel(config).path


@pytest.mark.parametrize("config", ["pti-4level", "pti-off", "pti-kaslr"])
def test_qemus_own_info_mem_parses_and_prints_back_byte_for_byte(config):
    text = (_real(config) / "cpu0.info_mem.txt").read_text()
    rows = parse_info_mem(text, "cpu0.info_mem.txt")
    assert len(rows) > 1000 and all(end - start == size for start, end, size, _ in rows if start < 1 << 47)
    assert format_parsed_info_mem(rows) == text


def test_qemus_own_info_tlb_parses_page_by_page():
    tlb = parse_info_tlb((_real("pti-4level") / "cpu0.info_tlb.txt").read_text())
    assert len(tlb) > 65536 and set(np.char.str_len(tlb["flags"]).tolist()) == {9}
    assert np.all(np.diff(tlb["va"].astype(np.float64)) > 0)


def test_real_walk_prints_qemus_info_tlb():
    # Its speed is bench/qemu_walker.py's.
    path = _real("pti-4level")
    from ptilab.memory.images import open_image
    meta = json.loads((path / "meta.json").read_text())
    w = walk(open_image(str(path / "core.elf")), meta["cpus"][0]["cr3"], FOUR_LEVEL)
    text = format_info_tlb(w)
    assert text == (path / "cpu0.info_tlb.txt").read_text()
