"""The linux-6.12 profile judged against every Debian kernel since 6.2 (6.12 and
7.2) booted under QEMU, KASLR off and on: 7.2's struct cpu_entry_area and its
init_cea_offsets() are 6.12's, so the one profile must match both.

The real boot's user tables give each CPU's cpu_entry_area slot (6.2+:
init_cea_offsets()); the model, booted with those very slots, must map the
same pages at the same offsets with the same rights and global bits, under
the same number of tables at each level.
"""

import numpy as np
import pytest

from ptilab.compare.views import pages, rights
from ptilab.linux import kernel as kernel_module
from ptilab.pti import boot
from ptilab.linux.profiles import CPU_ENTRY_AREA_BASE, CPU_ENTRY_AREA_MAP_SIZE, LINUX_6_12
from ptilab.paging import Geometry, walk
from ptilab.paging.entry import ADDRESS_MASK, PAGE_SIZE
from ptilab.paging.cr3 import CR3
from tests.realkernel.build import CONFIGS
from tests.realkernel.conftest import RealKernel, nokaslr_sibling, real_kernel

AREA = (CPU_ENTRY_AREA_BASE, CPU_ENTRY_AREA_BASE + CPU_ENTRY_AREA_MAP_SIZE)
# 6.2 brought init_cea_offsets(): under KASLR each CPU's area sits at a random slot
RANDOM_SLOT_CONFIGS = [c for c, spec in CONFIGS.items()
                       if spec.pti and tuple(map(int, spec.release.split("."))) >= (6, 2)]
RANDOM_SLOT_KASLR = [c for c in RANDOM_SLOT_CONFIGS if "nokaslr" not in CONFIGS[c].append.split()]
RANDOM_SLOT_NOKASLR = [c for c in RANDOM_SLOT_CONFIGS if c not in RANDOM_SLOT_KASLR]


@pytest.fixture(params=RANDOM_SLOT_CONFIGS)
def booted(request) -> RealKernel:
    return real_kernel(request.param)


def as_offsets(view: np.ndarray) -> list[tuple[int, str, bool]]:
    return [(int(va) - CPU_ENTRY_AREA_BASE, rights(int(eff)), bool(g))
            for va, eff, g in zip(view["va"], view["eff"], view["glb"])]


def real_slots(view: np.ndarray) -> list[int]:
    """The slots (cea_offset() values) of the CPU areas a view maps, read off its addresses."""
    offsets = view["va"] - np.uint64(CPU_ENTRY_AREA_BASE + LINUX_6_12.first_cpu_offset)
    above_idt = view["va"] >= np.uint64(CPU_ENTRY_AREA_BASE + LINUX_6_12.first_cpu_offset)
    return sorted(set((offsets[above_idt] // np.uint64(LINUX_6_12.stride)).tolist()))


def area_table_pages(mem, cr3: CR3, geometry) -> list[int]:
    """Table pages per level under the cpu_entry_area's P4D entry (4-level: its PGD entry), the
    unit Linux reserves for it. A 5-level PGD entry spans 256 TiB (the kernel image, modules and
    ESPfix too): the walk then starts at its P4D table, whose entries are laid out as a PGD's."""
    top = cr3.pgd
    if geometry.levels == 5:
        pgd_entry = int(mem.read_frame(top // PAGE_SIZE)[geometry.pgd_index(CPU_ENTRY_AREA_BASE)])
        top, geometry = pgd_entry & ADDRESS_MASK, Geometry(4)
    slot = geometry.pgd_index(CPU_ENTRY_AREA_BASE)
    return [len(t) for t in walk(mem, top, geometry, top_slots=(slot, slot + 1)).tables]


def boot_with_slots(monkeypatch, real: RealKernel, slots: list[int], design: str = "linux"):
    """The model booted with the real boot's slots in place of init_cea_offsets()'s draw."""
    monkeypatch.setattr(kernel_module, "init_cea_offsets", lambda *_: np.array(slots, dtype=np.int64))
    return boot("linux-6.12", design, cpus=len(real.meta["cpus"]), levels=real.geometry.levels)


def test_fixture_is_the_debian_release_it_names_with_pti(booted):
    meta = booted.meta
    assert meta["kernel_release"].startswith(CONFIGS[booted.config].release + ".") and meta["pti"]
    assert "Kernel/User page tables isolation: enabled" in (booted.path / "dmesg.txt").read_text()


def test_each_cpu_has_its_slot_and_the_idt_stays_at_the_base(booted):
    real = pages(walk(booted.mem, booted.cpu()["cr3"], booted.geometry), *AREA)
    slots = real_slots(real)
    assert int(real["va"][0]) == CPU_ENTRY_AREA_BASE and rights(int(real["eff"][0])) == "ro NX"
    assert len(slots) == len(booted.meta["cpus"])
    assert max(slots) < LINUX_6_12.max_cea()
    if booted.meta["kaslr"]:
        assert slots != list(range(len(slots)))  # scattered (by chance only 1 in 2.27 million squared not)
    else:
        assert slots == list(range(len(slots)))  # nokaslr: slot = CPU, as 6.1 lays it out


@pytest.mark.parametrize("design", ["linux", "shared-pmd", "mirror"])
def test_model_with_the_real_slots_maps_the_area_page_for_page(booted, design, monkeypatch):
    cr3 = booted.cpu()["cr3"]
    real = pages(walk(booted.mem, cr3, booted.geometry), *AREA)
    k = boot_with_slots(monkeypatch, booted, real_slots(real), design)
    model = pages(walk(k.ram, k.user_cr3(), k.geometry), *AREA)
    assert as_offsets(model) == as_offsets(real)
    # The TSS pages alias cpu_tss_rw; the model's frames differ, the aliasing must not.
    assert len(np.unique(real["pa"])) == len(np.unique(model["pa"]))


def test_model_builds_the_kernels_tables_for_the_real_slots(booted, monkeypatch):
    """One PUD table, a PMD table per GiB and a PTE table per 2 MiB the slots
    touch (an area across a 2 MiB boundary takes two), in both halves of the pair."""
    cr3 = booted.cpu()["cr3"]
    real = pages(walk(booted.mem, cr3, booted.geometry), *AREA)
    k = boot_with_slots(monkeypatch, booted, real_slots(real))
    for model_cr3, real_cr3 in ((k.user_cr3(), CR3(cr3).user()), (k.kernel_cr3(), CR3(cr3).kernel())):
        assert area_table_pages(k.ram, model_cr3, k.geometry) == \
            area_table_pages(booted.mem, real_cr3, booted.geometry)


@pytest.mark.parametrize("config", RANDOM_SLOT_NOKASLR)
def test_nokaslr_model_is_the_real_boot_without_help(config):
    real_boot = real_kernel(config)
    real = pages(walk(real_boot.mem, real_boot.cpu()["cr3"], real_boot.geometry), *AREA)
    k = boot("linux-6.12", "linux", cpus=len(real_boot.meta["cpus"]), kaslr=False)
    assert as_offsets(pages(walk(k.ram, k.user_cr3(), k.geometry), *AREA)) == as_offsets(real)


@pytest.mark.parametrize("config", RANDOM_SLOT_KASLR)
def test_random_slots_leave_the_idt_and_so_the_kaslr_slide_to_meltdown(config):
    """6.2's randomisation moves the CPU areas, not the RO IDT page at the base:
    its first gate still gives the kernel's slide, read through the user tables."""
    from ptilab.audit.sources import views_from_image
    from ptilab.mmu.meltdown import exposure

    unslid = real_kernel(nokaslr_sibling(config)).symbols
    k = real_kernel(config)
    found = views_from_image(k.mem, k.cpu()["cr3"], k.geometry)
    result = exposure(k.mem, found.user, unslid)
    assert result.text_base == k.symbols["_text"] != unslid["_text"]


def ptdump_section(text: str, marker: str = "---[ CPU entry Area ]---") -> list[str]:
    """The lines of one ptdump section, its marker line included."""
    lines = text.splitlines()
    start = lines.index(marker)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("---[")), len(lines))
    return lines[start:end]


@pytest.mark.parametrize("design", ["linux", "shared-pmd", "mirror"])
def test_models_ptdump_of_the_area_is_the_kernels_own_byte_for_byte(booted, design, monkeypatch):
    """The kernel's ptdump_walk_pgd_level_debugfs() of the stopped task's user PGD
    (the oracle module's text) against ptilab's ptdump of the model's, given the
    real slots: every page, every hole at every level, line for line."""
    from ptilab.formats.ptdump import format_walk, linux_markers

    assert booted.meta["oracle"], booted.meta.get("oracle_error")
    real = pages(walk(booted.mem, booted.cpu()["cr3"], booted.geometry), *AREA)
    k = boot_with_slots(monkeypatch, booted, real_slots(real), design)
    model = format_walk(walk(k.ram, k.user_cr3(), k.geometry), linux_markers(k.geometry))
    oracle = (booted.path / "oracle_user.txt").read_text()
    assert ptdump_section(model) == ptdump_section(oracle)
    assert len(ptdump_section(oracle)) > 30


def test_the_audit_calls_the_area_guessable_only_when_a_cpu_sits_at_the_fixed_slot(booted):
    from ptilab.audit import audit
    from ptilab.audit.sources import views_from_image

    cr3 = booted.cpu()["cr3"]
    fixed = 0 in real_slots(pages(walk(booted.mem, cr3, booted.geometry), *AREA))
    findings = audit(views_from_image(booted.mem, cr3, booted.geometry).views)
    assert ("PTI-CEA-FIXED" in {f.id for f in findings}) == fixed == (not booted.meta["kaslr"])
    (summary,) = [f.explanation for f in findings if f.id == "PTI-USER-VIEW"]
    assert ("see PTI-CEA-FIXED" in summary) == fixed
    assert ("slots are randomised" in summary) == (not fixed)
