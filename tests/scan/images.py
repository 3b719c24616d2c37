"""A synthetic multi-process image for scan tests: bench/large_image.py's
PTI kernel (one PGD pair, the CPUs' CR3s in QEMU notes) plus more mm's and
decoys, each at a known address.

- processes: PGD pairs copied from the kernel's (the kernel half is
  init_mm's in every mm); the last one's user PGD also maps the whole
  direct map (slot 273 set to the kernel PGD's entry): a planted leak;
- ldt: a pair whose kernel PGD and user PGD have an LDT slot (272) of their
  own, as map_ldt_struct() leaves it: still a root;
- accessed: a pair whose kernel-half entries lack the accessed bit: still a root;
- decoy_slot: a frame whose kernel half differs in one slot: not a root;
- decoy_outside: the kernel half, but a user-half entry pointing past the
  end of memory: rejected, it does not walk cleanly;
- odd: the kernel half in an odd frame whose even neighbour is empty: under
  PTI no mm's kernel PGD sits there, and its user half maps nothing: kernel-only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bench.large_image import GIB, build
from ptilab.memory.elfwrite import qemu_cpu_note, write_elf_core
from ptilab.paging import entry as e

MIB = 1 << 20
SLOTS_AT = 600 * MIB  # free frames in the 1 GiB layout (tables end below 80 MiB, user pages below 512 MiB)


@dataclass
class FleetImage:
    path: str
    kernel_cr3: int
    user_cr3: int
    processes: list[int] = field(default_factory=list)  # kernel PGDs of the clean processes (incl. the CPUs')
    planted: int = 0  # kernel PGD of the process whose user PGD maps the direct map
    ldt: int = 0
    accessed: int = 0
    decoy_slot: int = 0
    decoy_outside: int = 0
    odd: int = 0


def write_fleet_image(path: str, processes: int = 3, with_cpus: bool = True) -> FleetImage:
    kcr3, ucr3, chunks, _, _ = build(1)
    pages = dict((pa, data) for pa, data in chunks)
    kpgd, upgd = pages[kcr3], pages[ucr3]
    img = FleetImage(str(path), kcr3, ucr3, processes=[kcr3])
    at = SLOTS_AT

    def pair(k: np.ndarray, u: np.ndarray) -> int:
        nonlocal at
        pa = at
        pages[pa], pages[pa + e.PAGE_SIZE] = k, u
        at += 2 * e.PAGE_SIZE
        return pa

    for _ in range(processes):
        img.processes.append(pair(kpgd.copy(), upgd.copy()))
    leaky = upgd.copy()
    leaky[273] = kpgd[273]
    img.planted = pair(kpgd.copy(), leaky)

    ldt_table = at + 64 * e.PAGE_SIZE  # an empty (all-zero) PUD: the LDT pages are not mapped yet
    k, u = kpgd.copy(), upgd.copy()
    k[272] = u[272] = np.uint64(ldt_table | e.KERNPG_TABLE)
    img.ldt = pair(k, u)
    k = kpgd.copy()
    k[256:] &= ~np.uint64(e.A)
    img.accessed = pair(k, upgd.copy())

    k = kpgd.copy()
    k[300] = np.uint64(kcr3 | e.KERNPG_TABLE)
    img.decoy_slot = pair(k, upgd.copy())
    k = kpgd.copy()
    k[5] = np.uint64((2 * GIB) | e.PAGE_TABLE)  # a PUD beyond the 1 GiB of memory
    img.decoy_outside = pair(k, upgd.copy())
    img.odd = at + e.PAGE_SIZE
    pages[img.odd] = np.concatenate([np.zeros(256, np.uint64), kpgd[256:]])

    notes = [qemu_cpu_note(cr3=kcr3), qemu_cpu_note(cr3=ucr3, cs=0x33)] if with_cpus else []
    write_elf_core(path, [(0, GIB)], notes=notes, pages=sorted(pages.items()), align=e.PAGE_SIZE)
    return img
