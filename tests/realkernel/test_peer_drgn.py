"""A peer on the same dumps: drgn translates sampled addresses of both PTI views; ptilab agrees on every one.

drgn (PyPI) opens ELF cores and, through libkdumpfile, makedumpfile's
diskdump files; it finds the kernel from the VMCOREINFO note and walks the
page tables itself (libdrgn's x86-64 page-table iterator, 4 or 5 levels from
NUMBER(pgtable_l5_enabled)). follow_phys() wants a ``struct mm_struct *``
only to read its ``pgd``: without the kernel's debug info, a one-member
stand-in type carries the PGD's address. init_top_pgt and its PTI user twin
are in the kernel image, which drgn maps from KERNELOFFSET and phys_base
alone; a process's PGD is in the direct map, whose KASLR base drgn cannot
find without debug info, so the peer judges init_mm's pair.
"""

import numpy as np
import pytest
from drgn import FaultError, Object, Program, TypeKind, TypeMember
from drgn.helpers.linux.mm import follow_phys

from ptilab.memory.images import open_image
from ptilab.paging import Geometry, translate, walk
from ptilab.paging.translate import PageFault
from tests.realkernel.conftest import DUMP_CONFIGS, real_kernel

SAMPLES = 10_000  # per view, half inside mapped ranges, half anywhere canonical


def sample_addresses(mem, pgd: int, geometry: Geometry, rng: np.random.Generator, samples: int) -> list[int]:
    """Addresses to translate: pages picked inside the view's mapped ranges (at a
    random byte), and random canonical addresses, most of them unmapped."""
    ranges = walk(mem, pgd, geometry).ranges
    ranges = ranges[ranges["pa"] != 0]
    picks = rng.integers(0, len(ranges), samples // 2)
    offsets = (rng.random(samples // 2) * ranges["size"][picks]).astype(np.uint64)
    inside = (ranges["va"][picks] + offsets).tolist()
    anywhere = rng.integers(0, 1 << geometry.va_bits, samples // 2, dtype=np.uint64).tolist()
    return inside + [geometry.canonical(va) for va in anywhere]


def peer_mm(prog: Program, pgd_va: int) -> Object:
    """A stand-in ``struct mm_struct`` holding only ``pgd``: all follow_phys() reads of an mm.
    (Its answer is typed phys_addr_t, which the debug info would define.)"""
    phys_addr_t = prog.typedef_type("phys_addr_t", prog.int_type("unsigned long long", 8, False))
    if "phys_addr_t" not in prog.registered_type_finders():
        prog.register_type_finder("phys_addr_t", lambda prog, kinds, name, filename:
                                  phys_addr_t if name == "phys_addr_t" and TypeKind.TYPEDEF in kinds else None,
                                  enable_index=0)
    pgd_type = prog.pointer_type(prog.int_type("unsigned long", 8, False))
    mm_type = prog.struct_type("mm_struct", 8, [TypeMember(pgd_type, "pgd", 0)])
    return Object(prog, mm_type, value={"pgd": pgd_va})


def agree(path, samples: int, seed: int = 12) -> tuple[int, int]:
    """Translate samples addresses per view with drgn and ptilab (the kernel PGD,
    and PTI's user PGD where the image is a PTI pair: with PTI off that page is
    zero); returns (addresses compared, of them mapped). Fails on the first disagreement."""
    from ptilab.linux.pti_pair import find_pti_pair

    mem = open_image(path)
    info = mem.vmcoreinfo
    geometry = Geometry(info.levels)
    prog = Program()
    prog.set_core_dump(str(path))
    rng = np.random.default_rng(seed)
    compared = mapped = 0
    twins = (0, 0x1000) if find_pti_pair(mem, info.kernel_pgd, geometry).is_pti else (0,)
    for twin in twins:  # kernel PGD, then PTI's user PGD
        mm = peer_mm(prog, info.symbols["init_top_pgt"] + twin)
        for va in sample_addresses(mem, info.kernel_pgd + twin, geometry, rng, samples):
            try:
                theirs = follow_phys(mm, va).value_()
            except FaultError:
                theirs = None
            try:
                ours = translate(mem, info.kernel_pgd + twin, va, geometry).pa
            except PageFault:
                ours = None
            assert ours == theirs, f"{path.name} {'user' if twin else 'kernel'} view {va:#x}: ptilab {ours} drgn {theirs}"
            compared += 1
            mapped += ours is not None
    return compared, mapped


@pytest.mark.parametrize("config", DUMP_CONFIGS)
@pytest.mark.parametrize("name, samples", [("core.elf", SAMPLES), ("makedumpfile-lzo.dump", SAMPLES),
                                           ("kdump.elf", 2000), ("makedumpfile-zlib.dump", 2000)])
def test_drgn_and_ptilab_translate_init_mms_both_views_alike(config, name, samples):
    k = real_kernel(config)
    compared, mapped = agree(k.path / name, samples)
    views = 2 if k.meta["pti"] else 1
    assert compared == views * samples and mapped >= views * samples // 2  # every pick inside a range maps


def test_drgn_and_ptilab_agree_on_five_level_paging():
    compared, mapped = agree(real_kernel("pti-5level").path / "core.elf", 4000)
    assert compared == 8000 and mapped > 2000
