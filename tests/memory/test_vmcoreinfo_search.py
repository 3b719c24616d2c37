"""VMCOREINFO found in a dump's RAM: the kernel's copies are found, decoys that merely look like them are not.

A small machine stands for a booted x86-64 kernel: init_top_pgt maps the
kernel image (2 MiB pages) at its KASLR-slid address onto where it was
loaded, phys_base being the difference, as head_64.S sets it up.
"""

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptilab.memory.raw import RawImage
from ptilab.memory.simulated import SimulatedRAM
from ptilab.memory.vmcoreinfo import START_KERNEL_MAP, confirmation_failure, find_vmcoreinfo, parse_vmcoreinfo
from ptilab.paging import entry as e

MiB = 1 << 20
LOAD = 16 * MiB  # CONFIG_PHYSICAL_START: where the image is loaded, and linked
IMAGE = 32 * MiB
PGD, PUD, PMD = 0x10000, 0x11000, 0x12000  # init_top_pgt and the tables under it, from the image's start
RAM = 128 * MiB


def _text(offset: int, phys_base: int, pgd_va: int, osrelease: str = "6.1.0-test") -> str:
    """What crash_save_vmcoreinfo_init() and x86's arch_crash_save_vmcoreinfo() print, abridged."""
    signed = phys_base - (1 << 64) if phys_base >> 63 else phys_base
    return (f"OSRELEASE={osrelease}\nBUILD-ID=0123456789abcdef0123456789abcdef01234567\nPAGESIZE=4096\n"
            f"SYMBOL(init_uts_ns)={START_KERNEL_MAP + LOAD + offset + 0x1a00000:x}\n"
            f"SYMBOL(_stext)={START_KERNEL_MAP + LOAD + offset:x}\n"
            f"OFFSET(page.flags)=0\nNUMBER(phys_base)={signed}\nSYMBOL(init_top_pgt)={pgd_va:x}\n"
            f"NUMBER(pgtable_l5_enabled)=0\nKERNELOFFSET={offset:x}\nNUMBER(KERNEL_IMAGE_SIZE)=1073741824\n")


def _write(ram: SimulatedRAM, pa: int, data: bytes) -> None:
    data += b"\0" * (-len(data) % 8)
    words = np.frombuffer(data, dtype="<u8")
    while len(words):
        room = (e.PAGE_SIZE - pa % e.PAGE_SIZE) // 8
        ram.write_entries(pa, words[:room])
        pa, words = pa + room * 8, words[room:]


def _machine(offset: int = 0x36A00000, load: int = LOAD, mapped_at: int = 0) -> tuple[SimulatedRAM, str]:
    """RAM whose init_top_pgt maps the slid kernel image onto pa load, and the VMCOREINFO text of that boot.

    The page tables lie inside the image (init_top_pgt is a kernel symbol): PGD at load + 0x10000.
    mapped_at moves what the tables map the image onto, the tables themselves staying put."""
    ram = SimulatedRAM(RAM)
    phys_base = (load - LOAD - offset) % (1 << 64)  # __pa_symbol(va) = va - __START_KERNEL_map + phys_base
    pgd, pud, pmd = load + PGD, load + PUD, load + PMD
    text_va = START_KERNEL_MAP + LOAD + offset
    table = e.P | e.RW
    ram.write_entry(pgd + 8 * 511, pud | table)
    ram.write_entry(pud + 8 * ((text_va >> 30) & 511), pmd | table)
    for at in range(0, IMAGE, 2 * MiB):
        ram.write_entry(pmd + 8 * (((text_va + at) >> 21) & 511), (load + mapped_at + at) | table | e.PS | e.G)
    pgd_va = START_KERNEL_MAP + LOAD + offset + PGD
    return ram, _text(offset, phys_base, pgd_va)


def _note(text: str) -> bytes:
    """vmcoreinfo_note as update_vmcoreinfo_note() writes it: Elf64_Nhdr, name, text, final_note()."""
    body = text.encode()
    return struct.pack("<III", 11, len(body), 0) + b"VMCOREINFO\0\0" + body + b"\0" * (-len(body) % 4) + bytes(12)


def test_the_data_page_is_found_and_decodes_as_its_note_would():
    ram, text = _machine()
    _write(ram, 0x3000000, text.encode())
    found = find_vmcoreinfo(ram)
    assert found is not None and found.found_at == 0x3000000
    assert found.source == "found in memory at pa 0x3000000"
    assert found.entries == parse_vmcoreinfo(text).entries
    assert found.kernel_pgd == LOAD + PGD and found.kernel_offset == 0x36A00000


def test_the_note_copy_is_found_where_its_text_starts_and_may_run_into_the_next_frame():
    ram, text = _machine()
    text += "".join(f"OFFSET(filler.f{i})={i}\n" for i in range(260))[:4095 - len(text)]
    text = text[:text.rindex("\n") + 1]
    assert e.PAGE_SIZE - 24 < len(text) <= e.PAGE_SIZE
    _write(ram, 0x5000000, _note(text))
    found = find_vmcoreinfo(ram)
    assert found is not None and found.found_at == 0x5000000 + 24
    assert found.entries == parse_vmcoreinfo(text).entries


def test_nothing_to_find_is_none():
    ram, _ = _machine()
    _write(ram, 0x3000000, b"OSRELEASE")  # not even a line
    assert find_vmcoreinfo(ram) is None


def _rejected(ram: SimulatedRAM, text: str) -> str:
    _write(ram, 0x3000000, text.encode())
    assert find_vmcoreinfo(ram) is None
    why = confirmation_failure(ram, parse_vmcoreinfo(text))
    assert why
    return why


def test_a_page_that_merely_starts_like_it_is_no_vmcoreinfo():
    ram, _ = _machine()
    decoy = ("OSRELEASE=6.1.0\nPAGESIZE=4096\nSYMBOL(_stext)=ffffffff81000000\nSYMBOL(init_top_pgt)=ffffffff82a10000\n"
             "NUMBER(phys_base)=0\nKERNELOFFSET=0\n")
    assert "init_top_pgt" in _rejected(ram, decoy)


def test_a_real_vmcoreinfo_of_another_boot_is_refused_by_this_boots_tables():
    ram, _ = _machine(offset=0x36A00000)
    _, other = _machine(offset=0x12400000, load=48 * MiB)  # another slide, loaded elsewhere
    assert "init_top_pgt" in _rejected(ram, other)


def test_tables_that_map_the_image_elsewhere_than_phys_base_says_are_refused():
    ram, text = _machine(mapped_at=2 * MiB)
    assert "not to" in _rejected(ram, text)
    moved, _ = _machine(offset=0x36A00000 + 2 * MiB)  # the tables of another slide at the same place
    assert "do not map SYMBOL(_stext)" in _rejected(moved, text)


@pytest.mark.parametrize("edit, words", [
    (("PAGESIZE=4096", "PAGESIZE=65536"), "PAGESIZE"),
    (("KERNELOFFSET=36a00000", "KERNELOFFSET=36a01000"), "no KASLR slide"),
    (("KERNELOFFSET=36a00000\n", ""), "no KERNELOFFSET"),
    (("SYMBOL(_stext)", "SYMBOL(_etext)"), "no SYMBOL(_stext)"),
])
def test_entries_an_x86_64_kernel_writes_otherwise_are_refused(edit, words):
    ram, text = _machine()
    assert words in _rejected(ram, text.replace(*edit))


@pytest.mark.parametrize("garble", [b"\x01", b"\xff", b"no equals sign\n"])
def test_text_that_vmcoreinfo_append_str_never_writes_is_not_decoded(garble):
    ram, text = _machine()
    _write(ram, 0x3000000, text.encode().replace(b"PAGESIZE=4096\n", b"PAGESIZE=4096\n" + garble))
    assert find_vmcoreinfo(ram) is None


def test_decoys_before_the_real_copy_do_not_hide_it():
    ram, text = _machine()
    for i in range(8):  # identical decoys are judged once
        _write(ram, 0x2000000 + i * e.PAGE_SIZE, b"OSRELEASE=6.1.0\nSYMBOL(init_top_pgt)=ffffffff80001000\n")
    _write(ram, 0x3000000, text.encode())
    assert find_vmcoreinfo(ram).found_at == 0x3000000


@settings(max_examples=25, deadline=None)
@given(slot=st.integers(0, (1 << 29) // (2 * MiB) - 1), frame=st.integers(0x2000, 0x7FFF))
def test_any_slide_and_any_page_is_found_from_a_raw_image_of_the_machine(tmp_path_factory, slot, frame):
    offset = slot * 2 * MiB
    ram, text = _machine(offset=offset)
    _write(ram, frame << 12, text.encode())
    path = tmp_path_factory.mktemp("raw") / "mem.raw"
    with open(path, "wb") as f:  # sparse: only the frames the machine wrote
        for pfn in sorted(ram._frames):
            f.seek(pfn << 12)
            f.write(ram.read_frame(pfn).tobytes())
        f.truncate(RAM)
    with RawImage(path) as raw:
        found = raw.vmcoreinfo
        assert found is not None and found.found_at == frame << 12 and found.kernel_offset == offset
        assert raw.vmcoreinfo is found  # decoded once
