"""A small machine that stands for a booted x86-64 kernel, for the VMCOREINFO search's tests and fuzz target:
init_top_pgt maps the kernel image (2 MiB pages) at its KASLR-slid address onto where it was loaded,
phys_base being the difference, as head_64.S sets it up; and the VMCOREINFO text of that boot."""

import struct

import numpy as np

from ptilab.memory.simulated import SimulatedRAM
from ptilab.memory.vmcoreinfo import START_KERNEL_MAP
from ptilab.paging import entry as e

MiB = 1 << 20
LOAD = 16 * MiB  # CONFIG_PHYSICAL_START: where the image is loaded, and linked
IMAGE = 32 * MiB
PGD, PUD, PMD = 0x10000, 0x11000, 0x12000  # init_top_pgt and the tables under it, from the image's start
RAM = 128 * MiB


def vmcoreinfo_text(offset: int, phys_base: int, pgd_va: int, osrelease: str = "6.1.0-test") -> str:
    """What crash_save_vmcoreinfo_init() and x86's arch_crash_save_vmcoreinfo() print, abridged."""
    signed = phys_base - (1 << 64) if phys_base >> 63 else phys_base
    return (f"OSRELEASE={osrelease}\nBUILD-ID=0123456789abcdef0123456789abcdef01234567\nPAGESIZE=4096\n"
            f"SYMBOL(init_uts_ns)={START_KERNEL_MAP + LOAD + offset + 0x1a00000:x}\n"
            f"SYMBOL(_stext)={START_KERNEL_MAP + LOAD + offset:x}\n"
            f"OFFSET(page.flags)=0\nNUMBER(phys_base)={signed}\nSYMBOL(init_top_pgt)={pgd_va:x}\n"
            f"NUMBER(pgtable_l5_enabled)=0\nKERNELOFFSET={offset:x}\nNUMBER(KERNEL_IMAGE_SIZE)=1073741824\n")


def write(ram: SimulatedRAM, pa: int, data: bytes) -> None:
    data += b"\0" * (-len(data) % 8)
    words = np.frombuffer(data, dtype="<u8")
    while len(words):
        room = (e.PAGE_SIZE - pa % e.PAGE_SIZE) // 8
        ram.write_entries(pa, words[:room])
        pa, words = pa + room * 8, words[room:]


def machine(offset: int = 0x36A00000, load: int = LOAD, mapped_at: int = 0) -> tuple[SimulatedRAM, str]:
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
    return ram, vmcoreinfo_text(offset, phys_base, pgd_va)


def note(text: str) -> bytes:
    """vmcoreinfo_note as update_vmcoreinfo_note() writes it: Elf64_Nhdr, name, text, final_note()."""
    body = text.encode()
    return struct.pack("<III", 11, len(body), 0) + b"VMCOREINFO\0\0" + body + b"\0" * (-len(body) % 4) + bytes(12)
