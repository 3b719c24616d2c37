import json
import struct
from pathlib import Path

import numpy as np
import pytest

from ptilab.errors import FrameOutsideMemory, InputError
from ptilab.memory.elfcore import ElfCore
from ptilab.memory.elfwrite import EHDR, qemu_cpu_note, write_elf_core, write_memory_core
from ptilab.paging import walk
from ptilab.paging import entry as e
from ptilab.paging.geometry import FOUR_LEVEL
from ptilab.paging.install import map_page
from tests.conftest import BumpTables
from tests.realkernel.conftest import REAL_CONFIGS, real_kernel

REAL = Path(__file__).resolve().parents[1] / "realkernel" / "out"
MiB, GiB = 1 << 20, 1 << 30


def frame(tag: int) -> bytes:
    """A 4 KiB frame whose 512 entries are tag, tag+1, ...: any mix-up shows."""
    return np.arange(tag, tag + 512, dtype="<u8").tobytes()


def frames(*tags: int) -> bytes:
    return b"".join(frame(t) for t in tags)


def pfns(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.uint64)


@pytest.mark.parametrize("align", [1, 4096])
def test_frames_read_back_as_written_and_holes_are_absent(tmp_path, align):
    path = tmp_path / "core.elf"
    write_elf_core(path, [(0x0, frames(100, 200)), (0x10000, frames(300)), (0x100000, frames(400, 500, 600))],
                   align=align)
    core = ElfCore(path)
    assert core.segments == [(0, 0x2000), (0x10000, 0x11000), (0x100000, 0x103000)]
    assert core.end == 0x103000
    got = core.read_frames(pfns(0x102, 0, 0x10, 1, 0x100))
    want = np.frombuffer(frames(600, 100, 300, 200, 400), dtype="<u8").reshape(-1, 512)
    assert (got == want).all()
    assert core.frames_present(pfns(0, 1, 2, 0xF, 0x10, 0x11, 0xFF, 0x102, 0x103, 1 << 40)).tolist() == \
        [True, True, False, False, True, False, False, True, False, False]
    with pytest.raises(FrameOutsideMemory):
        core.read_frames(pfns(0, 2))
    assert core.read_entry(0x10008) == 301
    assert core.read(0x1FF0, 16) == struct.pack("<QQ", 710, 711)


def test_memory_the_file_does_not_hold_reads_as_zeros(tmp_path):
    # p_filesz < p_memsz: the rest of the segment is zero-filled memory; here
    # the file holds one and a half frames of a four-frame segment.
    path = tmp_path / "core.elf"
    write_elf_core(path, [(0x4000, frame(7) + frame(9)[:2048], 0x4000)])
    core = ElfCore(path)
    assert core.frames_present(pfns(4, 5, 6, 7, 8)).tolist() == [True, True, True, True, False]
    got = core.read_frames(pfns(7, 5, 4, 6))
    assert not got[0].any() and not got[3].any()
    assert (got[2] == np.arange(7, 7 + 512)).all()
    assert (got[1][:256] == np.arange(9, 9 + 256)).all() and not got[1][256:].any()


def test_frames_cut_by_an_unaligned_segment_edge_are_absent(tmp_path):
    # kdump writes e820 ranges as they are, e.g. one ending at 0x9fc00.
    path = tmp_path / "core.elf"
    data = bytes(0x800) + frames(1, 2) + bytes(0x400)
    write_elf_core(path, [(0x800, data)])
    core = ElfCore(path)
    assert core.frames_present(pfns(0, 1, 2, 3)).tolist() == [False, True, True, False]
    assert (core.read_frames(pfns(2, 1)) == np.frombuffer(frames(2, 1), "<u8").reshape(2, 512)).all()


def test_overlapping_and_split_segments_read_as_one_memory(tmp_path):
    # QEMU's paging mode (-p) writes a segment per virtual mapping: aliases
    # repeat physical ranges, and contiguous memory comes in pieces.
    path = tmp_path / "core.elf"
    write_elf_core(path, [(0x3000, frames(3, 4)), (0x1000, frames(1, 2)), (0x2000, frames(2, 3)),
                          (0x5000, 0x1000, 0x1000)])
    core = ElfCore(path)
    assert core.segments == [(0x1000, 0x3000), (0x3000, 0x4000), (0x4000, 0x5000), (0x5000, 0x6000)]
    got = core.read_frames(pfns(1, 2, 3, 4, 5))
    assert [int(row[0]) for row in got] == [1, 2, 3, 4, 0]
    # Pieces that continue each other in memory and in the file are joined.
    write_elf_core(path, [(0x1000, frame(1)), (0x2000, frame(2)), (0x3000, frame(3))])
    core = ElfCore(path)
    assert core.segments == [(0x1000, 0x4000)]
    assert [int(row[0]) for row in core.read_frames(pfns(3, 1, 2))] == [3, 1, 2]


def test_a_segment_qemu_did_not_dump_is_absent(tmp_path):
    path = tmp_path / "core.elf"
    write_elf_core(path, [(0x1000, frame(1)), (0x8000, 0)])
    raw = bytearray(path.read_bytes())
    # Second PT_LOAD: QEMU marks memory outside a dump filter with p_offset -1,
    # p_filesz 0 and the mapping's real p_memsz.
    ph = EHDR.size + 2 * 56
    struct.pack_into("<QQQQQ", raw, ph + 8, (1 << 64) - 1, 0x8000, 0x8000, 0, 0x4000)
    path.write_bytes(raw)
    core = ElfCore(path)
    assert core.segments == [(0x1000, 0x2000)]
    assert not core.frames_present(pfns(8)).any()


def test_qemu_cpu_notes_give_each_cpus_cr3_and_paging_mode(tmp_path):
    path = tmp_path / "core.elf"
    notes = [(b"CORE", 1, bytes(336)), (b"CORE", 1, bytes(336)),
             qemu_cpu_note(cr3=0x4000, cr4=0x6F0, cs=0x33, rip=0x401000),
             qemu_cpu_note(cr3=0x6000 | 0x1000 | 7, cr4=0x6F0 | (1 << 12) | (1 << 17), cs=0x10),
             (b"VMCOREINFO", 0, b"OSRELEASE=6.1.0\nPAGESIZE=4096\n")]
    write_elf_core(path, [(0, frame(0))], notes)
    core = ElfCore(path)
    assert [c.cr3 for c in core.cpus] == [0x4000, 0x7007]
    assert [c.cpl for c in core.cpus] == [3, 0]
    assert [c.geometry.levels for c in core.cpus] == [4, 5]
    assert core.cpus[0].rip == 0x401000
    assert core.cpus[1].cr3_register.pcid == 7 and core.cpus[1].cr3_register.pgd == 0x7000
    assert core.vmcoreinfo.entries == {"OSRELEASE": "6.1.0", "PAGESIZE": "4096"}
    assert core.vmcoreinfo.found_at is None and core.vmcoreinfo.source == "the dump's VMCOREINFO note"


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def test_a_sparse_64_gib_core_opens_and_reads_without_loading_it(tmp_path):
    path = tmp_path / "big.elf"
    spots = [0, 17 * GiB + 0x5000, 64 * GiB - 0x1000]
    write_elf_core(path, [(0, 64 * GiB)], pages=[(pa, frame(pa >> 12)) for pa in spots])
    assert path.stat().st_blocks * 512 < 8 * MiB
    before = _rss()
    core = ElfCore(path)
    got = core.read_frames(np.array([pa >> 12 for pa in spots] + [3 * GiB >> 12], dtype=np.uint64))
    assert [int(r[0]) for r in got] == [pa >> 12 for pa in spots] + [0]
    assert core.frames_present(pfns(64 * GiB >> 12)).tolist() == [False]
    assert _rss() - before < 32 * MiB


# -- the one walker over every source ---------------------------------------

def _tree() -> BumpTables:
    bump = BumpTables(size=1 << 30)
    pgd = 0x1000
    for va, pa, shift, flags in [
        (0x400000, 0x200000, 12, e.P | e.RW | e.US),
        (0x401000, 0x201000, 12, e.P | e.US),
        (0x7FFF_F000_0000, 0x400000, 21, e.P | e.RW | e.US | e.NX),
        (0xFFFF_8880_0000_0000, 0x0, 30, e.P | e.RW | e.G | e.NX),
        (0xFFFF_FE00_0000_0000, 0x3000, 12, e.P | e.G | e.NX),
        (0xFFFF_FFFF_8100_0000, 0x1000000, 21, e.P | e.G),
    ]:
        map_page(bump.ram, FOUR_LEVEL, pgd, va, pa, flags | e.A, bump.alloc, shift, table_flags=e.PAGE_TABLE)
    return bump


def _ram_frames(ram) -> list[int]:
    return ram.written_frames()


def test_walk_sees_the_same_ranges_in_simulated_ram_and_its_core(tmp_path):
    bump = _tree()
    path = tmp_path / "tree.elf"
    write_memory_core(path, bump.ram, _ram_frames(bump.ram), [qemu_cpu_note(cr3=0x1000)])
    core = ElfCore(path)
    want = walk(bump.ram, 0x1000, FOUR_LEVEL)
    got = walk(core, core.cpus[0].cr3_register, core.cpus[0].geometry)
    assert (got.ranges == want.ranges).all() and len(want.mapped) == 6
    assert [list(t) for t in got.tables] == [list(t) for t in want.tables]


@pytest.mark.parametrize("levels", [4, 5])
def test_walk_of_a_modelled_kernel_is_the_same_from_its_core(tmp_path, levels):
    from ptilab.pti import boot

    k = boot("linux-6.1", "linux", cpus=2, levels=levels)
    path = tmp_path / "kernel.elf"
    cr3s = (k.kernel_cr3(), k.user_cr3())
    write_memory_core(path, k.ram, _ram_frames(k.ram),
                      [qemu_cpu_note(cr3=c.value, cr4=0x6F0 | (levels == 5) << 12) for c in cr3s])
    core = ElfCore(path)
    for cr3, cpu in zip(cr3s, core.cpus):
        assert cpu.cr3 == cr3.value
        want = walk(k.ram, cr3, k.geometry)
        got = walk(core, cpu.cr3_register, cpu.geometry)
        assert (got.ranges == want.ranges).all()


# -- errors: one line naming the file ----------------------------------------

def _error(path) -> str:
    with pytest.raises(InputError) as info:
        ElfCore(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


def test_a_missing_file_is_an_input_error(tmp_path):
    assert "cannot read" in _error(tmp_path / "nope.elf")
    assert "cannot read" in _error(tmp_path)


def test_a_file_that_is_not_elf_is_an_input_error(tmp_path):
    (tmp_path / "a").write_bytes(b"MZ" + bytes(100))
    (tmp_path / "b").write_bytes(b"")
    (tmp_path / "c").write_bytes(b"\x7fELF\x02\x01")
    for name in "abc":
        _error(tmp_path / name)


def test_a_truncated_core_is_an_input_error(tmp_path):
    path = tmp_path / "core.elf"
    write_elf_core(path, [(0, frames(1, 2, 3))], [qemu_cpu_note()])
    whole = path.read_bytes()
    path.write_bytes(whole[:-100])
    assert "truncated" in _error(path)
    path.write_bytes(whole[:EHDR.size + 30])
    _error(path)


@pytest.mark.parametrize("offset, value, says", [
    (4, b"\x01", "ELFCLASS64"),  # 32-bit class
    (16, struct.pack("<H", 2), "ET_EXEC"),  # an executable, not a core
    (18, struct.pack("<H", 183), "EM_AARCH64"),  # another machine
])
def test_a_core_of_another_kind_is_an_input_error(tmp_path, offset, value, says):
    path = tmp_path / "core.elf"
    write_elf_core(path, [(0, frame(1))])
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(value)] = value
    path.write_bytes(raw)
    assert says in _error(path)


def _extended_numbering(path: Path, sh_info: int) -> None:
    """Rewrite the core's e_phnum as PN_XNUM, its count in section header 0's
    sh_info, as the gABI says a core with 65535 or more program headers does."""
    raw = bytearray(path.read_bytes())
    shoff = len(raw)
    raw += struct.pack("<IIQQQQII", 0, 0, 0, 0, 0, 0, 0, sh_info) + bytes(16)
    struct.pack_into("<Q", raw, 40, shoff)  # e_shoff
    struct.pack_into("<HHH", raw, 56, 0xFFFF, 64, 1)  # e_phnum, e_shentsize, e_shnum
    path.write_bytes(raw)


def test_extended_program_header_numbering_reads_the_count_from_section_0(tmp_path):
    path = tmp_path / "core.elf"
    write_elf_core(path, [(0x0, frames(100, 200)), (0x100000, frames(300))], [qemu_cpu_note(cr3=0x1000)])
    plain = ElfCore(path)
    _extended_numbering(path, 3)  # the note and two loads
    core = ElfCore(path)
    assert core.segments == plain.segments == [(0, 0x2000), (0x100000, 0x101000)]
    assert [c.cr3 for c in core.cpus] == [0x1000]
    assert (core.read_frames(pfns(0x100))[0] == np.frombuffer(frame(300), "<u8")).all()
    _extended_numbering(path, 1)  # a count that drops the loads: nothing of memory is read
    assert ElfCore(path).segments == []


def test_extended_numbering_without_its_section_header_is_refused(tmp_path):
    path = tmp_path / "core.elf"
    write_elf_core(path, [(0x0, frame(1))])
    raw = bytearray(path.read_bytes())
    struct.pack_into("<H", raw, 56, 0xFFFF)  # PN_XNUM, e_shoff still 0
    path.write_bytes(raw)
    assert "PN_XNUM" in _error(path)


# -- a real QEMU dump, when tests/realkernel/build.py has made one ------------

@pytest.mark.parametrize("config", REAL_CONFIGS)
def test_real_core_notes_carry_the_cr3_and_cr4_qemu_reported(config):
    core_path = real_kernel(config).path / "core.elf"
    meta = json.loads((core_path.parent / "meta.json").read_text())
    core = ElfCore(core_path)
    assert [(c.cr3, c.cr4) for c in core.cpus] == [(c["cr3"], c["cr4"]) for c in meta["cpus"]]
    assert [c.cpl for c in core.cpus] == [c["cpl"] for c in meta["cpus"]]
    assert all(c.geometry.levels == (5 if meta["la57"] else 4) for c in core.cpus)
    assert all(core.frames_present(np.array([c.cr3 >> 12], dtype=np.uint64))[0] for c in core.cpus)
