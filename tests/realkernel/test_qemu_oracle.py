"""QEMU's own page walker as the oracle: ptilab must print exactly what QEMU printed."""

import pytest

from ptilab.formats.qemu import format_info_mem, format_info_tlb, parse_info_mem, parse_info_tlb
from ptilab.paging import walk
from tests.realkernel.conftest import REAL_CONFIGS, real_kernel


@pytest.mark.parametrize("config", REAL_CONFIGS)
@pytest.mark.parametrize("cpu", [0, 1])
def test_dump_equals_qemus_own_walk_line_for_line(config, cpu):
    k = real_kernel(config)
    w = walk(k.mem, k.cpu(cpu)["cr3"], k.geometry)
    tlb = (k.path / f"cpu{cpu}.info_tlb.txt").read_text()
    assert format_info_tlb(w) == tlb
    if not k.meta["la57"]:  # QEMU 7.2's mem_info_la57 prints nothing: info tlb is the oracle there
        assert format_info_mem(w) == (k.path / f"cpu{cpu}.info_mem.txt").read_text()


def test_qemu_text_parses_back():
    k = real_kernel("pti-4level")
    mem = parse_info_mem((k.path / "cpu0.info_mem.txt").read_text())
    assert mem[0][3] in ("ur-", "urw") and all(end - start == size for start, end, size, _ in mem[:100])
    tlb = parse_info_tlb((k.path / "cpu0.info_tlb.txt").read_text())
    assert len(tlb) > 65536 and all(len(flags) == 9 for _, _, flags in tlb[:100])
