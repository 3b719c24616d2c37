import json
from pathlib import Path

import numpy as np
import pytest

from ptilab.pti import boot
from ptilab.linux.pti_pair import find_pti_pair
from ptilab.memory.images import open_image
from ptilab.memory.simulated import SimulatedRAM
from ptilab.paging import entry as e
from ptilab.paging.geometry import FIVE_LEVEL, FOUR_LEVEL
from tests.realkernel.conftest import REAL_CONFIGS, real_kernel

REAL = Path(__file__).resolve().parents[1] / "realkernel" / "out"
KERNEL, USER = 0x20000, 0x21000
TABLE = e.PAGE_TABLE  # user-half entries as Linux writes them
KTABLE = e.KERNPG_TABLE


def _pair(kernel: dict[int, int], user: dict[int, int]) -> SimulatedRAM:
    ram = SimulatedRAM(1 << 24)
    for base, slots in ((KERNEL, kernel), (USER, user)):
        for slot, value in slots.items():
            ram.write_entry(base + 8 * slot, value)
    return ram


def _linux_like() -> tuple[dict[int, int], dict[int, int]]:
    """The top of a real 6.1 pair (4-level): user slots 0 and 255, direct map,
    vmalloc, vmemmap in the kernel only; CEA and espfix shared; the direct-map
    and kernel-text slots through user-only tables."""
    kernel = {0: 0x100000 | TABLE | e.NX, 255: 0x101000 | TABLE | e.NX, 273: 0x200000 | KTABLE,
              402: 0x201000 | KTABLE, 468: 0x202000 | KTABLE, 508: 0x203000 | KTABLE,
              510: 0x204000 | KTABLE, 511: 0x205000 | KTABLE}
    user = {0: 0x100000 | TABLE, 255: 0x101000 | TABLE & ~e.A, 273: 0x300000 | KTABLE,
            508: 0x203000 | KTABLE, 510: 0x204000 | KTABLE, 511: 0x301000 | KTABLE}
    return kernel, user


@pytest.mark.parametrize("cr3", [KERNEL, USER, USER | 0x18])
def test_a_linux_pair_is_recognised_from_either_half(cr3):
    pair = find_pti_pair(_pair(*_linux_like()), cr3, FOUR_LEVEL)
    assert (pair.kernel_pgd, pair.user_pgd) == (KERNEL, USER)
    assert pair.is_pti, pair.reasons
    text = " ".join(pair.reasons)
    assert "508 (cpu_entry_area), 510 (espfix)" in text and "273, 511 (kernel text)" in text
    assert "kernel copies carry NX" in text


@pytest.mark.parametrize("levels", [4, 5])
def test_the_modelled_kernels_pairs_are_pti_pairs(levels):
    k = boot("linux-6.1", "linux", cpus=2, levels=levels)
    for cr3 in (k.user_cr3(), k.kernel_cr3(), k.kernel_pgd):
        assert find_pti_pair(k.ram, cr3, k.geometry).is_pti


def test_pti_off_leaves_the_upper_page_empty():
    kernel, _ = _linux_like()
    kernel = {slot: v & ~e.NX if slot < 256 else v for slot, v in kernel.items()}
    pair = find_pti_pair(_pair(kernel, {}), KERNEL, FOUR_LEVEL)
    assert not pair.is_pti
    assert "all zero" in pair.reasons[0]


def test_a_neighbouring_full_pgd_is_not_a_user_pgd():
    # Without PTI the frame after a PGD may be any page, e.g. another
    # process's PGD: its kernel half is the same full copy.
    kernel, _ = _linux_like()
    other = {slot: v for slot, v in kernel.items() if slot >= 256} | {3: 0x400000 | TABLE}
    pair = find_pti_pair(_pair(kernel, other), KERNEL, FOUR_LEVEL)
    assert not pair.is_pti
    text = " ".join(pair.reasons)
    assert "full copy" in text and "differ beyond NX" in text


def test_a_kernel_copy_without_nx_is_not_linux_pti():
    kernel, user = _linux_like()
    kernel[0] &= ~e.NX
    pair = find_pti_pair(_pair(kernel, user), USER, FOUR_LEVEL)
    assert not pair.is_pti and "lack NX" in pair.reasons[0]


def test_a_user_pgd_mapping_kernel_slots_the_kernel_lacks_is_not_a_pair():
    kernel, user = _linux_like()
    user[300] = 0x500000 | KTABLE
    pair = find_pti_pair(_pair(kernel, user), USER, FOUR_LEVEL)
    assert not pair.is_pti and "lacks: 300" in pair.reasons[0]


def test_a_pair_outside_memory_is_not_a_pair():
    pair = find_pti_pair(SimulatedRAM(0x21000), USER, FOUR_LEVEL)
    assert not pair.is_pti and pair.reasons == (f"user PGD {USER:#x} not in memory",)


def test_in_five_level_paging_the_fixed_regions_share_one_pgd_slot():
    kernel = {0: 0x100000 | TABLE | e.NX, 273: 0x200000 | KTABLE, 0x1F4: 0x201000 | KTABLE, 511: 0x205000 | KTABLE}
    user = {0: 0x100000 | TABLE, 273: 0x300000 | KTABLE, 511: 0x301000 | KTABLE}
    pair = find_pti_pair(_pair(kernel, user), USER, FIVE_LEVEL)
    assert pair.is_pti
    assert "511 (cpu_entry_area/espfix/kernel text)" in " ".join(pair.reasons)


# -- real kernels, when tests/realkernel/build.py has made them --------------

@pytest.mark.parametrize("config", REAL_CONFIGS)
def test_the_user_cpus_cr3_is_a_pti_pair_exactly_when_pti_is_on(config):
    core_path = real_kernel(config).path / "core.elf"
    meta = json.loads((core_path.parent / "meta.json").read_text())
    core = open_image(core_path)
    cpu = core.cpus[meta["user_cpu"]]
    assert cpu.cpl == 3
    pair = find_pti_pair(core, cpu.cr3_register, cpu.geometry)
    assert pair.is_pti == meta["pti"], pair.reasons
    if meta["pti"]:
        assert cpu.cr3_register.is_user_half_of_pair
        assert np.any(core.read_frame(pair.kernel_pgd >> 12)[:256] >> np.uint64(63))
