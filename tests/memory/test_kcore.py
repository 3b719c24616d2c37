"""The /proc/kcore reader, on kcore-shaped files holding the Debian 6.1 fixture's real page tables."""

import os
import struct

import numpy as np
import pytest

from ptilab.errors import FrameOutsideMemory, InputError
from ptilab.memory.kcore import NO_PADDR, Kcore
from ptilab.memory.vmcoreinfo import parse_vmcoreinfo
from tests.memory.fake_kcore import KERNEL_TEXT, PAGE_OFFSET, fixture_vmcoreinfo, table_frames, write_kcore
from tests.realkernel.conftest import real_kernel


@pytest.fixture(scope="module")
def kcore_4level(tmp_path_factory):
    k = real_kernel("pti-4level")
    info = fixture_vmcoreinfo("pti-4level")
    frames = table_frames(k.mem, parse_vmcoreinfo(info).kernel_pgd, 4)
    path = tmp_path_factory.mktemp("kcore") / "kcore"
    data_offset = write_kcore(path, [(0, 0xA0000), (0x100000, k.mem.end - 0x100000)], frames, info)
    return k, path, frames, data_offset


def test_frames_read_through_kcore_equal_the_core(kcore_4level):
    k, path, frames, _ = kcore_4level
    with Kcore(path) as kc:
        pfns = np.array(sorted(frames), dtype=np.uint64)
        assert (kc.read_frames(pfns) == k.mem.read_frames(pfns)).all()
        assert kc.end == k.mem.end


def test_segments_keep_kcores_virtual_addresses_and_the_vmcoreinfo_note(kcore_4level):
    _, path, _, data_offset = kcore_4level
    with Kcore(path) as kc:
        ram = [s for s in kc.segments if s.paddr not in (NO_PADDR,) and s.vaddr < KERNEL_TEXT]
        # kc_vaddr_to_offset(): a direct-map segment sits at vaddr - PAGE_OFFSET + data_offset, i.e. pa + data_offset
        assert all(s.vaddr == PAGE_OFFSET + s.paddr and s.offset == s.paddr + data_offset for s in ram)
        assert any(s.paddr == NO_PADDR for s in kc.segments)  # vmalloc: no physical address
        assert kc.vmcoreinfo.kernel_pgd == 0x2A10000


def test_frames_outside_ram_and_in_the_hole_are_absent(kcore_4level):
    _, path, _, _ = kcore_4level
    with Kcore(path) as kc:
        present = kc.frames_present(np.array([0x9F, 0xA0, 0xFF, 0x100, (kc.end >> 12) - 1, kc.end >> 12], np.uint64))
        assert present.tolist() == [True, False, False, True, True, False]
        with pytest.raises(FrameOutsideMemory):
            kc.read_frame(0xA0)


def test_the_text_segment_repeating_ram_is_read_at_the_ram_segments_offset(kcore_4level):
    """init_top_pgt lies in KCORE_TEXT too, whose p_offset is ~120 TiB in: a reader
    that used it would fail with a short read; the RAM segment's offset gives the table."""
    k, path, _, _ = kcore_4level
    pgd = 0x2A10000
    with Kcore(path) as kc:
        text = next(s for s in kc.segments if s.vaddr == KERNEL_TEXT)
        assert text.paddr <= pgd < text.paddr + text.size and text.offset > os.path.getsize(path)
        frame = kc.read_frame(pgd >> 12)
        assert frame[256:].any() and (frame == k.mem.read_frame(pgd >> 12)).all()


def _patched(path, tmp_path, offset, fmt, value):
    data = bytearray(open(path, "rb").read(8192))
    struct.pack_into(fmt, data, offset, value)
    bad = tmp_path / "kcore"
    bad.write_bytes(bytes(data))
    return bad


@pytest.mark.parametrize("offset,fmt,value,words", [
    (0, "<I", 0x464C457F ^ 1, "no ELF magic"),
    (4, "<B", 1, "ELFCLASS64"),
    (16, "<H", 2, "ET_EXEC file, not a core"),
    (18, "<H", 183, "a core for EM_AARCH64, not x86-64"),
    (54, "<H", 32, "program headers of 32 bytes"),
    (56, "<H", 0, "no PT_LOAD segment"),
    (32, "<Q", 1 << 40, "past the end"),
    (32, "<Q", (1 << 64) - 1, "past the end"),
    (64 + 32, "<Q", 1 << 30, "more than kcore writes"),
])
def test_a_malformed_kcore_is_refused_in_one_line(kcore_4level, tmp_path, offset, fmt, value, words):
    _, path, _, _ = kcore_4level
    with pytest.raises(InputError) as err:
        Kcore(_patched(path, tmp_path, offset, fmt, value))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_truncated_kcore_refuses_the_frame_it_cannot_read(kcore_4level, tmp_path):
    _, path, frames, data_offset = kcore_4level
    cut = tmp_path / "kcore"
    with open(path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(data_offset + 0x1000))
    with Kcore(cut) as kc, pytest.raises(InputError, match="read 0 of 4096 bytes"):
        kc.read_frame(max(frames))


def test_a_missing_kcore_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        Kcore(tmp_path / "kcore")
    assert not os.path.exists(tmp_path / "kcore")
