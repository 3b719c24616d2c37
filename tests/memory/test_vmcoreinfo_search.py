"""VMCOREINFO found in a dump's RAM: the kernel's copies are found, decoys that merely look like them are not
(the machine: tests/memory/kernel_image.py)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptilab.memory.raw import RawImage
from ptilab.memory.simulated import SimulatedRAM
from ptilab.memory.vmcoreinfo import confirmation_failure, find_vmcoreinfo, parse_vmcoreinfo
from ptilab.paging import entry as e
from tests.memory.kernel_image import LOAD, PGD, RAM, MiB
from tests.memory.kernel_image import machine as _machine
from tests.memory.kernel_image import note as _note
from tests.memory.kernel_image import write as _write

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
