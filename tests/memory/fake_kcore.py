"""Files shaped like /proc/kcore (fs/proc/kcore.c), from real memory, and fake /proc and /sys roots around them.

The layout is read_kcore_iter()'s: ELF header, PT_NOTE then one PT_LOAD per
kcore_list entry, the CORE and VMCOREINFO notes, then data at
``vaddr - PAGE_OFFSET + data_offset`` (page-aligned). Only the RAM segments
hold bytes (a sparse file); the vmalloc and text segments are described as
the kernel describes them but lie ~70-120 TiB into the file, past what a test
file system holds, exactly the part a reader must never touch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ptilab.memory.elfwrite import EHDR, EM_X86_64, ET_CORE, EV_CURRENT, NHDR, PHDR, PT_LOAD, PT_NOTE
from ptilab.memory.physical import PhysicalMemory

PAGE_OFFSET = 0xFFFF_8880_0000_0000  # page_offset_base without KASLR, 4-level
VMALLOC_START = 0xFFFF_C900_0000_0000
KERNEL_TEXT = 0xFFFF_FFFF_8100_0000
NO_PADDR = (1 << 64) - 1
NT_PRSTATUS, NT_PRPSINFO = 1, 3
REALKERNEL = Path(__file__).resolve().parents[1] / "realkernel" / "out"


def _notes(vmcoreinfo: str | None) -> bytes:
    out = bytearray()
    notes = [(b"CORE", NT_PRSTATUS, bytes(336)), (b"CORE", NT_PRPSINFO, bytes(136))]
    if vmcoreinfo is not None:
        notes.append((b"VMCOREINFO", 0, vmcoreinfo.encode()))
    for name, ntype, desc in notes:
        name += b"\0"
        out += NHDR.pack(len(name), len(desc), ntype) + name.ljust(-(-len(name) // 4) * 4, b"\0")
        out += desc.ljust(-(-len(desc) // 4) * 4, b"\0")
    return bytes(out)


def write_kcore(path: Path, ram: list[tuple[int, int]], frames: dict[int, bytes], vmcoreinfo: str | None,
                page_offset: int = PAGE_OFFSET) -> int:
    """Write a kcore-shaped file with RAM ranges [(pa, size)], the given frames
    (pfn -> 4096 bytes) filled in; returns data_offset."""
    notes = _notes(vmcoreinfo)
    loads = [(page_offset + pa, pa, size) for pa, size in ram]
    loads.append((VMALLOC_START, NO_PADDR, 32 << 40))
    loads.append((KERNEL_TEXT, 0x100_0000, 0x200_0000))  # KCORE_TEXT: __pa_symbol(_text)
    phnum = 1 + len(loads)
    data_offset = -(-(EHDR.size + PHDR.size * phnum + len(notes)) // 4096) * 4096
    ident = b"\x7fELF" + bytes([2, 1, EV_CURRENT]) + bytes(9)
    head = EHDR.pack(ident, ET_CORE, EM_X86_64, EV_CURRENT, 0, EHDR.size, 0, 0, EHDR.size, PHDR.size, phnum, 0, 0, 0)
    phdrs = PHDR.pack(PT_NOTE, 0, EHDR.size + PHDR.size * phnum, 0, 0, len(notes), 0, 0)
    for vaddr, paddr, size in loads:
        offset = (vaddr - page_offset + data_offset) & NO_PADDR
        phdrs += PHDR.pack(PT_LOAD, 7, offset, vaddr, paddr, size, size, 4096)
    with open(path, "wb") as f:
        f.write(head + phdrs + notes)
        f.truncate(data_offset + max(pa + size for pa, size in ram))
        for pfn, data in sorted(frames.items()):
            f.seek(data_offset + (pfn << 12))
            f.write(data)
    return data_offset


def fixture_vmcoreinfo(config: str) -> str:
    """VMCOREINFO as Linux 6.1 writes it, for a nokaslr fixture (phys_base 0, init_top_pgt from kallsyms)."""
    meta = json.loads((REALKERNEL / config / "meta.json").read_text())
    pgt = next(line.split()[0] for line in (REALKERNEL / config / "kallsyms.txt").read_text().splitlines()
               if line.endswith(" init_top_pgt"))
    return (f"OSRELEASE={meta['kernel_release']}\nPAGESIZE=4096\nSYMBOL(init_uts_ns)=ffffffff82a12345\n"
            f"NUMBER(phys_base)=0\nSYMBOL(init_top_pgt)={pgt}\nNUMBER(pgtable_l5_enabled)={int(meta['la57'])}\n"
            f"KERNELOFFSET=0\nNUMBER(KERNEL_IMAGE_SIZE)=1073741824\nNUMBER(sme_mask)=0\n")


def table_frames(mem: PhysicalMemory, pgd: int, levels: int, data: tuple[int, ...] = ()) -> dict[int, bytes]:
    """The frames of every table reachable from pgd and from its PTI twin, and the frames at data (pas)."""
    from ptilab.paging import Geometry, walk

    pfns = {pa >> 12 for pa in data}
    for table in (pgd, pgd + 0x1000):
        w = walk(mem, table, Geometry(levels))
        pfns.update(int(p) for p in w.all_table_frames())
    pfns = sorted(pfns)
    data = mem.read_frames(np.array(pfns, dtype=np.uint64))
    return {pfn: row.tobytes() for pfn, row in zip(pfns, data)}


def fake_root(root: Path, config: str, *, meltdown: str | None = "Mitigation: PTI", pti_flag: bool = True,
              log: str | None = "Kernel/User page tables isolation: enabled", cmdline: str | None = None,
              kcore: bool = True, current_user: str | None = None) -> Path:
    """A directory standing for / of a machine running the fixture's kernel:
    proc/kcore over the fixture's page tables, and the claims as given."""
    from ptilab.formats.kallsyms import read_symbols
    from ptilab.memory.images import open_image
    from ptilab.memory.vmcoreinfo import parse_vmcoreinfo

    meta = json.loads((REALKERNEL / config / "meta.json").read_text())
    (root / "proc").mkdir(parents=True, exist_ok=True)
    (root / "proc/version").write_text(f"Linux version {meta['kernel_release']}\n")
    if kcore:
        info = fixture_vmcoreinfo(config)
        mem = open_image(REALKERNEL / config / "core.elf")
        symbols = read_symbols(REALKERNEL / config / "kallsyms.txt")
        variables = tuple(symbols[n] - 0xFFFF_FFFF_8000_0000 for n in ("page_offset_base", "vmalloc_base", "vmemmap_base"))
        frames = table_frames(mem, parse_vmcoreinfo(info).kernel_pgd, 5 if meta["la57"] else 4, variables)
        write_kcore(root / "proc/kcore", [(0, 0xA0000), (0x100000, mem.end - 0x100000)], frames, info)
    cpuinfo = (REALKERNEL / config / "cpuinfo.txt").read_text()
    cpuinfo = "\n".join(line.replace(" pti", "") + (" pti" if pti_flag and line.startswith("flags") else "")
                         for line in cpuinfo.splitlines()) + "\n"
    (root / "proc/cpuinfo").write_text(cpuinfo)
    (root / "proc/cmdline").write_text((cmdline if cmdline is not None else meta["append"]) + "\n")
    (root / "proc/kallsyms").write_text((REALKERNEL / config / "kallsyms.txt").read_text())
    if meltdown is not None:
        sysfs = root / "sys/devices/system/cpu/vulnerabilities"
        sysfs.mkdir(parents=True, exist_ok=True)
        (sysfs / "meltdown").write_text(meltdown + "\n")
    if log is not None:
        (root / "dev").mkdir(exist_ok=True)
        (root / "dev/kmsg").write_text(f"6,100,91794,-;{log}\n")
    if current_user is not None:
        debugfs = root / "sys/kernel/debug/page_tables"
        debugfs.mkdir(parents=True, exist_ok=True)
        (debugfs / "current_user").write_text(current_user)
    return root
