"""VMCOREINFO decoding: the lines arch_crash_save_vmcoreinfo() and crash_save_vmcoreinfo_init() print."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ptilab.errors import InputError
from ptilab.memory.vmcoreinfo import START_KERNEL_MAP, parse_vmcoreinfo, pgd_pair

# From a Debian 6.1 KASLR boot under QEMU (the pti-kaslr fixture), trimmed.
REAL_6_1 = """OSRELEASE=6.1.0-57-amd64
PAGESIZE=4096
SYMBOL(swapper_pg_dir)=ffffffff89410000
SYMBOL(_stext)=ffffffff87a00000
NUMBER(NR_FREE_PAGES)=0
NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)=-129
NUMBER(phys_base)=-25165824
SYMBOL(init_top_pgt)=ffffffff89410000
NUMBER(pgtable_l5_enabled)=0
KERNELOFFSET=6a00000
NUMBER(KERNEL_IMAGE_SIZE)=1073741824
"""


def test_real_6_1_note_gives_init_top_pgt_through_a_negative_phys_base():
    info = parse_vmcoreinfo(REAL_6_1.encode() + b"\0\0")
    assert info.osrelease == "6.1.0-57-amd64"
    assert info.kernel_offset == 0x6A00000
    assert info.phys_base == (1 << 64) - 0x1800000  # "%ld" of an unsigned long
    assert info.levels == 4
    # __pa_symbol: 0xffffffff89410000 - 0xffffffff80000000 - 0x1800000
    assert info.kernel_pgd == 0x7C10000
    assert pgd_pair(info) == (0x7C10000, 0x7C11000)
    assert info.numbers["PAGE_BUDDY_MAPCOUNT_VALUE"] == -129
    assert info.symbols["_stext"] == 0xFFFFFFFF87A00000


def test_la57_kernel_says_five_levels():
    info = parse_vmcoreinfo(REAL_6_1.replace("pgtable_l5_enabled)=0", "pgtable_l5_enabled)=1"))
    assert info.levels == 5


def test_swapper_pg_dir_serves_when_init_top_pgt_is_not_named():
    text = "\n".join(l for l in REAL_6_1.splitlines() if "init_top_pgt" not in l)
    assert parse_vmcoreinfo(text).kernel_pgd == 0x7C10000


def test_no_kaslr_means_offset_zero():
    text = "\n".join(l for l in REAL_6_1.splitlines() if "KERNELOFFSET" not in l)
    assert parse_vmcoreinfo(text).kernel_offset == 0


@pytest.mark.parametrize("text, words", [
    ("NUMBER(phys_base)=0x\n", "is not a number"),
    ("NUMBER(phys_base)=0\nSYMBOL(init_top_pgt)=zz\n", "not a 64-bit hexadecimal"),
    ("NUMBER(phys_base)=0\nKERNELOFFSET=1" + "0" * 17 + "\n", "not a 64-bit hexadecimal"),
    ("NUMBER(phys_base)=" + "9" * 30 + "\n", "does not fit in 64 bits"),
])
def test_malformed_notes_are_refused_with_the_key(text, words):
    with pytest.raises(InputError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_vmcoreinfo(text)


def test_a_note_without_phys_base_decodes_but_makes_no_address_physical():
    # paging_mode still takes pgtable_l5_enabled from such a note; only __pa_symbol() needs phys_base.
    info = parse_vmcoreinfo("OSRELEASE=6.1\nNUMBER(pgtable_l5_enabled)=1\nSYMBOL(init_top_pgt)=ffffffff82a10000\n")
    assert info.phys_base is None and info.levels == 5
    with pytest.raises(InputError, match=r"no NUMBER\(phys_base\)"):
        info.kernel_pgd


def test_a_note_without_a_pgd_symbol_says_so():
    info = parse_vmcoreinfo("NUMBER(phys_base)=0\n")
    with pytest.raises(InputError, match="neither init_top_pgt nor swapper_pg_dir"):
        info.kernel_pgd


@given(pa=st.integers(0, (1 << 52) - 1).map(lambda n: n & ~0xFFF), phys_base=st.integers(0, (1 << 64) - 1))
def test_pa_symbol_inverts_the_kernel_image_mapping(pa, phys_base):
    # The kernel maps its image at va = __START_KERNEL_map + pa - phys_base;
    # the kernel prints phys_base with "%ld": as a signed number.
    signed = phys_base - (1 << 64) if phys_base >> 63 else phys_base
    va = (START_KERNEL_MAP + pa - phys_base) % (1 << 64)
    info = parse_vmcoreinfo(f"NUMBER(phys_base)={signed}\nSYMBOL(init_top_pgt)={va:x}\n")
    assert info.phys_base == phys_base
    assert info.kernel_pgd == pa
