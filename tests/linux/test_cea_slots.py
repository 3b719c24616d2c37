"""linux-6.12: init_cea_offsets()'s random per-CPU cpu_entry_area slots, and the designs on them."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptilab.compare.metrics import measure
from ptilab.compare.views import pages, rights
from ptilab.linux.kernel import init_cea_offsets
from ptilab.pti import boot
from ptilab.linux.profiles import CPU_ENTRY_AREA_BASE, LINUX_6_1, LINUX_6_12
from ptilab.paging import walk

P4D = 1 << 39
STRIDE = 0x3B000  # sizeof(struct cpu_entry_area) on Debian's 6.1 and 6.12 alike
# One CPU's area as a real Debian 6.12 boot maps it (offsets from the CPU's
# area), written out by hand so the test does not restate the profile.
REAL_6_12_CPU = (
    [(0x0000, "ro NX"), (0x1000, "RW NX")]  # GDT, entry stack
    + [(0x2000 + i * 0x1000, "ro NX") for i in range(5)]  # TSS
    + [(base + i * 0x1000, "RW NX") for base in (0x8000, 0xB000, 0xE000, 0x11000) for i in range(2)]  # IST stacks
    + [(0x1A000, "RW NX")]  # debug store
)
few_boots = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_max_cea_is_the_p4d_less_the_idt_page_over_the_stride():
    assert LINUX_6_12.max_cea() == (P4D - 0x1000) // STRIDE == 2274876


@given(st.integers(1, 8192), st.integers(0, 2**64 - 1))
@settings(max_examples=30, deadline=None)
def test_every_cpu_gets_a_distinct_slot_inside_the_area(cpus, seed):
    slots = init_cea_offsets(LINUX_6_12, cpus, True, seed)
    assert len(slots) == cpus == len(np.unique(slots))
    assert slots.min() >= 0 and slots.max() < LINUX_6_12.max_cea()
    # The last byte of the highest slot's area is still inside the area's P4D.
    assert 0x1000 + (int(slots.max()) + 1) * STRIDE <= P4D


@given(st.integers(1, 512), st.integers(0, 2**32))
@settings(max_examples=30, deadline=None)
def test_same_seed_same_layout(cpus, seed):
    assert np.array_equal(init_cea_offsets(LINUX_6_12, cpus, True, seed), init_cea_offsets(LINUX_6_12, cpus, True, seed))


def test_different_seeds_scatter_differently():
    assert not np.array_equal(init_cea_offsets(LINUX_6_12, 4, True, 0), init_cea_offsets(LINUX_6_12, 4, True, 1))


@pytest.mark.parametrize("profile, kaslr", [(LINUX_6_12, False), (LINUX_6_1, True)])
def test_without_kaslr_or_before_6_2_slot_is_cpu(profile, kaslr):
    assert init_cea_offsets(profile, 9, kaslr, 5).tolist() == list(range(9))


def test_nokaslr_6_12_maps_the_area_as_6_1_does():
    def kernel_view(profile, **kw):
        k = boot(profile, "linux", cpus=3, **kw)
        view = pages(walk(k.ram, k.kernel_cr3(), k.geometry), CPU_ENTRY_AREA_BASE, CPU_ENTRY_AREA_BASE + P4D)
        return [(int(p["va"]), rights(int(p["eff"]))) for p in view]
    assert kernel_view("linux-6.12", kaslr=False) == kernel_view("linux-6.1")


@given(st.integers(0, 2**32), st.integers(1, 24), st.sampled_from([4, 5]))
@few_boots
def test_idt_at_the_base_and_each_cpus_pieces_at_its_slot(seed, cpus, levels):
    k = boot("linux-6.12", "linux", cpus=cpus, levels=levels, seed=seed)
    view = pages(walk(k.ram, k.kernel_cr3(), k.geometry), CPU_ENTRY_AREA_BASE, CPU_ENTRY_AREA_BASE + P4D)
    got = {int(p["va"]): rights(int(p["eff"])) for p in view}
    want = {CPU_ENTRY_AREA_BASE: "ro NX"}  # the RO IDT page stays at the base
    for slot in k.cea_offset.tolist():
        start = CPU_ENTRY_AREA_BASE + 0x1000 + slot * STRIDE
        want.update((start + off, r) for off, r in REAL_6_12_CPU)
    assert got == want
    assert view["glb"].all()


@given(st.integers(0, 2**32), st.integers(1, 40), st.sampled_from(["mirror", "shared-pmd", "linux"]))
@few_boots
def test_sharing_designs_user_view_of_each_cpus_area_is_the_kernels(seed, cpus, design):
    report = measure(boot("linux-6.12", design, cpus=cpus, seed=seed))
    assert report.cea_divergences == [] and report.violations == []


@given(st.integers(0, 2**32), st.integers(1, 16))
@few_boots
def test_explicit_diverges_at_every_cpus_slot_as_its_2017_list_says(seed, cpus):
    k = boot("linux-6.12", "explicit", cpus=cpus, seed=seed)
    divergences = measure(k).cea_divergences
    at = {(d.va, d.kind, d.pages) for d in divergences}
    assert (CPU_ENTRY_AREA_BASE, "missing in user view", 1) in at  # the RO IDT: not on the 2017 list
    for cpu in range(cpus):
        base = k.cpu_base(cpu)
        assert (base + 0x1000, "missing in user view", 1) in at  # entry stack page
        assert (base + 0x2000, "rights differ", 5) in at  # TSS RW in 2017, RO since 4.15
        assert (base + 0x1A000, "missing in user view", 1) in at  # debug store


def test_scattered_slots_cost_shared_pmd_a_user_pmd_table_per_gib_and_linux_nothing():
    fixed = {d: measure(boot("linux-6.12", d, cpus=64, kaslr=False)) for d in ("shared-pmd", "linux")}
    k = boot("linux-6.12", "shared-pmd", cpus=64, seed=3)
    scattered = {"shared-pmd": measure(k), "linux": measure(boot("linux-6.12", "linux", cpus=64, seed=3))}
    gibs = len({va >> 30 for va in k.area_pmds()})
    assert gibs > 32  # 64 areas in 512 GiB rarely share a GiB
    # The user PUD table and one user PMD table per GiB the slots touch, beyond what linux allocates.
    extra = scattered["shared-pmd"].user_table_pages - scattered["linux"].user_table_pages
    assert extra == 1 + gibs
    assert fixed["shared-pmd"].user_table_pages - fixed["linux"].user_table_pages == 2
    assert scattered["linux"].user_table_pages == fixed["linux"].user_table_pages
    assert scattered["linux"].pte_writes == fixed["linux"].pte_writes
    assert not any(r.ap_work for r in (*fixed.values(), *scattered.values()))


def test_area_pmds_of_a_fixed_layout_are_its_contiguous_run():
    k = boot("linux-6.12", "linux", cpus=40, kaslr=False)
    end = CPU_ENTRY_AREA_BASE + 0x1000 + 40 * STRIDE
    assert k.area_pmds() == list(range(CPU_ENTRY_AREA_BASE, end, 1 << 21))


def test_random_slots_cost_the_kernel_its_own_tables():
    fixed = measure(boot("linux-6.12", "linux", cpus=256, kaslr=False))
    scattered = measure(boot("linux-6.12", "linux", cpus=256, seed=1))
    assert fixed.kernel_cea_tables == 1 + 1 + 30  # PUD, PMD, the PTE tables of 256 * 0x3b000 + 4 KiB
    assert scattered.kernel_cea_tables > 256 + 200  # a PTE table per CPU (some two), a PMD table per GiB touched


def _readme_rows() -> dict[int, list[tuple[int, int]]]:
    """The README's table of tables per NR_CPUS: (random, slot = CPU) per column."""
    from pathlib import Path
    import re

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = re.fullmatch(r"\| (\d+) \|((?: \d+ \(\d+\) \|){5})", line)
        if cells:
            rows[int(cells[1])] = [(int(a), int(b)) for a, b in re.findall(r"(\d+) \((\d+)\)", cells[2])]
    return rows


@pytest.mark.parametrize("cpus", [1, 8, 64])
def test_readme_table_of_tables_is_what_compare_measures(cpus):
    from ptilab.compare.metrics import compare

    random, fixed = (compare("linux-6.12", cpus, kaslr=k, seed=0) for k in (True, False))
    measured = [(random[0].kernel_cea_tables, fixed[0].kernel_cea_tables)]
    measured += [(r.user_table_pages, f.user_table_pages) for r, f in zip(random, fixed)]
    assert _readme_rows()[cpus] == measured


@pytest.mark.parametrize("workload", ["syscall", "context-switch"])
def test_6_12_entry_code_touches_what_6_1s_does(workload):
    """entry_SYSCALL_64 still spills to cpu_tss_rw.sp2 and reads the per-CPU top of stack:
    the 6.1 steps of the workloads run on 6.12 too, wherever the CPU's area lies."""
    from ptilab.mmu.cost import cost

    old, new = cost("linux-6.1", "linux", 2, workload=workload)[0], cost("linux-6.12", "linux", 2, workload=workload)[0]
    assert new.cold.accesses == old.cold.accesses and new.cold.faults == old.cold.faults == ()


@pytest.mark.parametrize("design, ap_work", [("shared-pmd", False), ("mirror", True)])
def test_shared_pmd_still_needs_no_ap_work_if_random_areas_came_with_the_aps(design, ap_work):
    """A 6.12 that mapped each area in cpu_init() (as 2017 did): shared-pmd then
    has to preallocate the kernel's tables of every slot before the first AP: a
    PTE table per 2 MiB and a PMD table per GiB that hold a slot, beyond the
    ones CPU 0's area (mapped in early boot) already has."""
    from dataclasses import replace

    from ptilab.linux.kernel import Kernel
    from ptilab.pti import get_design

    lazy = replace(LINUX_6_12, cea_at_boot=False, header=())
    k = Kernel(lazy, get_design(design), 64, 4, seed=5).boot()
    report = measure(k)
    assert report.cea_divergences == [] and report.ap_work == ap_work
    if design == "shared-pmd":
        cpu0 = (k.cpu_base(0), k.cpu_base(0) + STRIDE - 1)
        pmds, gibs = set(k.area_pmds()), {va >> 30 for va in k.area_pmds()}
        new = len(pmds - {va >> 21 << 21 for va in cpu0}) + len(gibs - {va >> 30 for va in cpu0})
        preallocated = [a for a in k.alloc.log if a.owner == design and a.purpose.startswith("kernel table")]
        assert len(preallocated) == new > 64


@given(st.integers(0, 2**32))
@settings(max_examples=3, deadline=None)
def test_layout_changes_at_random_slots_break_only_the_explicit_design(seed):
    from ptilab.compare.layout_change import run

    outcomes = run("linux-6.12", cpus=3, seed=seed)
    assert {o.design for o in outcomes if not o.correct} == {"explicit"}
    assert all(o.correct for o in outcomes if o.design != "explicit")
