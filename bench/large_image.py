"""A synthetic memory image of a large x86-64 Linux machine under PTI, for benchmarks.

The image holds only page tables; everything else reads as zeros, and the
file is sparse, so "64 GiB of RAM" costs the ~130 MiB its tables occupy. The
tree is shaped like a 4-level Linux 6.1 kernel with ``pti=on``:

  kernel PGD (CR3 of the kernel view), 8 KiB-aligned
    slot 0    a small user process: text RX, heap and stack RW (NX in the kernel PGD's copy)
    slot 273  direct map at 0xffff888000000000: all N GiB in 4 KiB pages
              (N x 512 PTE tables; with 64 GiB, 32768 tables and 16.8 M PTEs),
              as with ``rodata=full``/``debug_pagealloc`` or after splitting
    slot 468  vmemmap at 0xffffea0000000000: struct pages (64 bytes per 4 KiB) in 2 MiB pages
    slot 508  cpu_entry_area: IDT page, then per CPU (2 CPUs) GDT, entry stack,
              TSS, exception stacks, debug store, as observed on 6.1
    slot 511  kernel image at 0xffffffff81000000: text RX, rodata RO, data RW in 2 MiB pages
  user PGD = kernel PGD + 4096 (CR3 of the user view)
    slot 0    the same process, executable
    slot 273  a user-only PUD/PMD/PTE holding one cpu_tss_rw page per CPU
    slot 508  the *same* entry as the kernel PGD's: the cpu_entry_area tables are shared
    slot 511  a user-only PUD/PMD cloning the kernel's first 2 MiB of text (the entry text)

Library use::

    from bench.large_image import write_image
    img = write_image("/tmp/64g.elf", gib=64)        # or raw=True
    img.kernel_cr3, img.user_cr3, img.table_pages

Command line::

    python bench/large_image.py --gib 64 --out /tmp/64g.elf [--raw]

A raw image gets a ``<out>.json`` beside it with the two CR3s; an ELF core
carries them in QEMU CPU notes (CPU 0 in the kernel, CPU 1 in user mode).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ptilab.memory.elfwrite import qemu_cpu_note, write_elf_core  # noqa: E402
from ptilab.paging import entry as e  # noqa: E402

GIB = 1 << 30
MIB = 1 << 20
PAGE = 4096
CPUS = 2

PAGE_OFFSET = 0xFFFF_8880_0000_0000
VMEMMAP = 0xFFFF_EA00_0000_0000
CEA = 0xFFFF_FE00_0000_0000
KERNEL_TEXT = 0xFFFF_FFFF_8100_0000
# Kernel image: where Linux loads it without KASLR (16 MiB), text / rodata / data.
KERNEL_PA = 16 * MIB
TEXT_MIB, RODATA_MIB, DATA_MIB = 16, 8, 8
TABLES_PA = 64 * MIB  # page tables from here on, one after another
CEA_STRIDE = 0x3B000  # 6.1 per-CPU stride observed on the real kernel
USER_PAGE_TABLE = e.PAGE_TABLE
KERN_TABLE = e.KERNPG_TABLE
NX = np.uint64(e.NX)


@dataclass(frozen=True)
class SyntheticImage:
    path: str
    raw: bool
    gib: int
    kernel_cr3: int
    user_cr3: int
    table_pages: int  # distinct table frames written (both views)
    direct_map_ptes: int
    file_bytes_used: int  # allocated on disk (the file is sparse)


def _slot(va: int, shift: int) -> int:
    return (va >> shift) & 511


class _Tables:
    """Table frames handed out one after another from TABLES_PA; contents in numpy."""

    def __init__(self) -> None:
        self.next = TABLES_PA
        self.small: dict[int, np.ndarray] = {}

    def table(self) -> tuple[int, np.ndarray]:
        pa = self.next
        self.next += PAGE
        row = np.zeros(512, np.uint64)
        self.small[pa] = row
        return pa, row

    def block(self, count: int) -> int:
        """count consecutive frames, whose contents the caller writes itself."""
        pa = self.next
        self.next += count * PAGE
        return pa


def build(gib: int) -> tuple[int, int, list[tuple[int, np.ndarray]], int, int]:
    """The tree for gib GiB of RAM: (kernel CR3, user CR3, [(pa, frames bytes)],
    distinct table frames, direct-map PTEs). The big direct-map PTE block comes
    as one (pa, array) chunk; every other table as one frame."""
    if gib < 1 or gib > 512:
        raise ValueError("gib must be 1..512 (one PUD table of direct map)")
    ram = gib * GIB
    t = _Tables()
    pgd_pair = t.block(2)
    kpgd = np.zeros(512, np.uint64)
    upgd = np.zeros(512, np.uint64)
    t.small[pgd_pair] = kpgd
    t.small[pgd_pair + PAGE] = upgd
    pte_pa, ptes, pmd_pa, pmds = _direct_map(t, kpgd, gib)
    text_pmd = _kernel_image(t, kpgd)
    vm_pa = _vmemmap(t, kpgd, ram)
    _cpu_entry_area(t, kpgd, upgd)
    _user_entry_text(t, upgd, text_pmd)
    _user_cpu_tss(t, upgd)
    _user_process(t, kpgd, upgd)
    if t.next > min(vm_pa, 256 * MIB):  # the user process's frames start at 256 MiB
        raise ValueError(f"{gib} GiB is too small for its own tables")
    chunks = [(pte_pa, ptes), (pmd_pa, pmds)] + sorted(t.small.items())
    n_pte_tables = gib * 512
    table_pages = n_pte_tables + gib + len(t.small)
    return pgd_pair, pgd_pair + PAGE, chunks, table_pages, n_pte_tables * 512


def _direct_map(t: _Tables, kpgd: np.ndarray, gib: int) -> tuple[int, np.ndarray, int, np.ndarray]:
    """1 PUD, gib PMD tables, gib * 512 PTE tables, all 4 KiB pages: (PTE block pa, PTEs, PMD block pa, PMDs)."""
    n_pte_tables = gib * 512
    pte_pa = t.block(n_pte_tables)
    pmd_pa = t.block(gib)
    dm_pud_pa, dm_pud = t.table()
    ptes = (np.arange(n_pte_tables * 512, dtype=np.uint64) << np.uint64(12)) | np.uint64(e.PAGE_KERNEL)
    pmds = (pte_pa + (np.arange(gib * 512, dtype=np.uint64) << np.uint64(12))) | np.uint64(KERN_TABLE)
    dm_pud[:gib] = (pmd_pa + (np.arange(gib, dtype=np.uint64) << np.uint64(12))) | np.uint64(KERN_TABLE)
    kpgd[_slot(PAGE_OFFSET, 39)] = dm_pud_pa | KERN_TABLE
    return pte_pa, ptes, pmd_pa, pmds


def _kernel_image(t: _Tables, kpgd: np.ndarray) -> np.ndarray:
    """2 MiB pages: text RX, rodata RO NX, data RW NX (all global); returns the PMD table."""
    k_pud_pa, k_pud = t.table()
    k_pmd_pa, k_pmd = t.table()
    kpgd[511] = k_pud_pa | KERN_TABLE
    k_pud[_slot(KERNEL_TEXT, 30)] = k_pmd_pa | KERN_TABLE
    first = _slot(KERNEL_TEXT, 21)
    big = e.PS
    flags = ([e.PAGE_KERNEL_ROX | big] * (TEXT_MIB // 2) + [e.PAGE_KERNEL_RO | big] * (RODATA_MIB // 2)
             + [e.PAGE_KERNEL | big] * (DATA_MIB // 2))
    idx = np.arange(len(flags), dtype=np.uint64)
    k_pmd[first:first + len(flags)] = (np.uint64(KERNEL_PA) + (idx << np.uint64(21))) | np.array(flags, np.uint64)
    return k_pmd


def _vmemmap(t: _Tables, kpgd: np.ndarray, ram: int) -> int:
    """64 bytes of struct page per 4 KiB frame, in 2 MiB pages at the top of RAM; returns where they start."""
    vm_bytes = max(2 * MIB, ram // PAGE * 64)
    vm_pages = vm_bytes // (2 * MIB)
    vm_pa = (ram - vm_bytes) & ~(2 * MIB - 1)
    vm_pud_pa, vm_pud = t.table()
    kpgd[_slot(VMEMMAP, 39)] = vm_pud_pa | KERN_TABLE
    for i in range(-(-vm_pages // 512)):
        pmd_pa_i, pmd_i = t.table()
        vm_pud[i] = pmd_pa_i | KERN_TABLE
        n = min(512, vm_pages - i * 512)
        pmd_i[:n] = (np.uint64(vm_pa + i * GIB) + (np.arange(n, dtype=np.uint64) << np.uint64(21))) | \
            np.uint64(e.PAGE_KERNEL_LARGE)
    return vm_pa


def _cpu_entry_area(t: _Tables, kpgd: np.ndarray, upgd: np.ndarray) -> None:
    """One PUD/PMD/PTE chain, shared by both PGDs at the top level."""
    cea_pud_pa, cea_pud = t.table()
    cea_pmd_pa, cea_pmd = t.table()
    cea_pte_pa, cea_pte = t.table()
    kpgd[_slot(CEA, 39)] = cea_pud_pa | KERN_TABLE
    upgd[_slot(CEA, 39)] = kpgd[_slot(CEA, 39)]
    cea_pud[0] = cea_pmd_pa | KERN_TABLE
    cea_pmd[0] = cea_pte_pa | KERN_TABLE
    ro, rw = e.PAGE_KERNEL_RO, e.PAGE_KERNEL
    backing = iter(range(KERNEL_PA + (TEXT_MIB + RODATA_MIB) * MIB, KERNEL_PA + 32 * MIB, PAGE))
    cea_pte[0] = next(backing) | ro  # IDT
    per_cpu = [(0x1000, ro), (0x2000, rw)] + [(0x3000 + i * PAGE, ro) for i in range(5)]
    for stack in range(4):  # DF, NMI, DB, MCE: two pages each behind a guard page
        base = 0x9000 + stack * 0x3000
        per_cpu += [(base, rw), (base + PAGE, rw)]
    per_cpu.append((0x1B000, rw))  # debug store
    for cpu in range(CPUS):
        for off, prot in per_cpu:
            cea_pte[(cpu * CEA_STRIDE + off) >> 12] = next(backing) | prot


def _user_entry_text(t: _Tables, upgd: np.ndarray, k_pmd: np.ndarray) -> None:
    """The user PGD clones the kernel's first text PMD entry."""
    u_k_pud_pa, u_k_pud = t.table()
    u_k_pmd_pa, u_k_pmd = t.table()
    upgd[511] = u_k_pud_pa | KERN_TABLE
    u_k_pud[_slot(KERNEL_TEXT, 30)] = u_k_pmd_pa | KERN_TABLE
    first = _slot(KERNEL_TEXT, 21)
    u_k_pmd[first] = k_pmd[first]


def _user_cpu_tss(t: _Tables, upgd: np.ndarray) -> None:
    """cpu_tss_rw, one direct-map page per CPU, in user-only tables."""
    u_dm_pud_pa, u_dm_pud = t.table()
    u_dm_pmd_pa, u_dm_pmd = t.table()
    u_dm_pte_pa, u_dm_pte = t.table()
    upgd[_slot(PAGE_OFFSET, 39)] = u_dm_pud_pa | KERN_TABLE
    tss_pa = KERNEL_PA + 30 * MIB  # in the kernel's data, where per-CPU areas live
    u_dm_pud[_slot(PAGE_OFFSET + tss_pa, 30)] = u_dm_pmd_pa | KERN_TABLE
    u_dm_pmd[_slot(PAGE_OFFSET + tss_pa, 21)] = u_dm_pte_pa | KERN_TABLE
    for cpu in range(CPUS):
        pa = tss_pa + cpu * 0x40000
        u_dm_pte[_slot(PAGE_OFFSET + pa, 12)] = pa | e.PAGE_KERNEL


def _user_process(t: _Tables, kpgd: np.ndarray, upgd: np.ndarray) -> None:
    """A small user process: text at 0x400000, heap after it, stack below 0x7ffffffff000."""
    u_pud_pa, u_pud = t.table()
    u_pmd_pa, u_pmd = t.table()
    u_pte_pa, u_pte = t.table()
    s_pud_pa, s_pud = t.table()
    s_pmd_pa, s_pmd = t.table()
    s_pte_pa, s_pte = t.table()
    user_frames = iter(range(256 * MIB, 512 * MIB, PAGE))
    kpgd[0] = u_pud_pa | USER_PAGE_TABLE | e.NX  # the kernel PGD's copy never executes user code
    upgd[0] = u_pud_pa | USER_PAGE_TABLE
    u_pud[0] = u_pmd_pa | USER_PAGE_TABLE
    u_pmd[2] = u_pte_pa | USER_PAGE_TABLE
    for i in range(16):
        u_pte[i] = next(user_frames) | e.PAGE_USER_RX
    for i in range(16, 80):
        u_pte[i] = next(user_frames) | e.PAGE_SHARED | e.D
    stack_top = 0x7FFF_FFFF_F000
    kpgd[_slot(stack_top, 39)] = s_pud_pa | USER_PAGE_TABLE | e.NX
    upgd[_slot(stack_top, 39)] = s_pud_pa | USER_PAGE_TABLE
    s_pud[_slot(stack_top, 30)] = s_pmd_pa | USER_PAGE_TABLE
    s_pmd[_slot(stack_top, 21)] = s_pte_pa | USER_PAGE_TABLE
    for i in range(480, 511):
        s_pte[i] = next(user_frames) | e.PAGE_SHARED | e.D


def write_image(path: str | os.PathLike[str], gib: int, raw: bool = False) -> SyntheticImage:
    """Write the image (sparse) and return what a benchmark needs to walk it."""
    path = os.fspath(path)
    kcr3, ucr3, chunks, table_pages, ptes = build(gib)
    ram = gib * GIB
    if raw:
        with open(path, "wb") as f:
            f.truncate(ram)
            for pa, data in chunks:
                f.seek(pa)
                f.write(memoryview(np.ascontiguousarray(data)).cast("B"))
        Path(path + ".json").write_text(json.dumps({"kernel_cr3": kcr3, "user_cr3": ucr3, "gib": gib}) + "\n")
    else:
        # QEMU-like: CPU 0 in the kernel (kernel CR3), CPU 1 in user mode (user CR3).
        write_elf_core(path, [(0, ram)], notes=[qemu_cpu_note(cr3=kcr3), qemu_cpu_note(cr3=ucr3, cs=0x33)],
                       pages=chunks, align=PAGE)
    used = os.stat(path).st_blocks * 512
    return SyntheticImage(path, raw, gib, kcr3, ucr3, table_pages, ptes, used)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=int, required=True, help="GiB of RAM the direct map covers")
    parser.add_argument("--out", required=True)
    parser.add_argument("--raw", action="store_true", help="a raw image (+ .json with the CR3s) instead of an ELF core")
    args = parser.parse_args()
    start = time.perf_counter()
    img = write_image(args.out, args.gib, args.raw)
    info = asdict(img)
    print(f"wrote {img.path} in {time.perf_counter() - start:.1f} s: " +
          ", ".join(f"{k} {v:#x}" if k.endswith("cr3") else f"{k} {v}" for k, v in info.items() if k != "path"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
