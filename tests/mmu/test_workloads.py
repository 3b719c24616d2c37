"""Entry/exit workloads on booted kernels: they resolve, run, and cost what PTI's CR3 switches imply."""

import pytest

from ptilab.errors import InputError, UsageError
from ptilab.linux.kernel import boot
from ptilab.linux.profiles import PROFILES
from ptilab.mmu.cost import PTI_OFF, cost, measure, sweep
from ptilab.mmu.workload import available, load, processes, resolve, symbols

WORKLOADS = ("context-switch", "interrupt", "nmi", "syscall")


def test_the_four_workloads_ship():
    assert set(WORKLOADS) <= set(available())


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_step_resolves_on_every_profile(profile):
    kernel = boot(profile, "linux", cpus=2)
    procs = processes(kernel, 2)
    for name in WORKLOADS:
        for step in load(name).steps:
            if step.at and (not step.profiles or profile in step.profiles):
                names = symbols(kernel, 1, procs[step.of or 0])
                assert resolve(step.at, names)


def test_symbols_name_the_cpu_entry_area_pieces_per_cpu():
    kernel = boot("linux-6.1", "linux", cpus=2)
    cpu1 = symbols(kernel, 1)
    assert resolve("gdt", cpu1) == 0xFFFF_FE00_0003_C000  # the real 6.1 kernel's CPU 1 GDT
    assert resolve("entry_stack_page.top", cpu1) == 0xFFFF_FE00_0003_CFF8 + 0x1000
    assert resolve("tss.sp0", cpu1) == resolve("tss", cpu1) + 4
    assert resolve("idt+0x20", cpu1) == 0xFFFF_FE00_0000_0020
    with pytest.raises(UsageError):
        resolve("no_such_thing", cpu1)


def test_a_user_workload_file_loads_and_bad_ones_are_refused(tmp_path):
    good = tmp_path / "mine.toml"
    good.write_text('name = "mine"\n[[step]]\ndo = "read"\nat = "idt"\n[[step]]\ndo = "switch_to_kernel_cr3"\n')
    costs = cost("linux-6.1", "linux", 2, 4, str(good), pcid=True)
    assert costs[0].workload == "mine" and costs[0].cold.tlb_misses == 1
    bad = tmp_path / "bad.toml"
    bad.write_text('[[step]]\ndo = "teleport"\n')
    with pytest.raises(InputError):
        load(str(bad))


@pytest.mark.parametrize("design", ["mirror", "shared-pmd", "linux"])
def test_the_workloads_run_without_a_fault_on_6_1(design):
    for c in cost("linux-6.1", design, 4, 4, None, pcid=True):
        assert not c.cold.faults and not c.warm.faults, (c.workload, c.cold.faults)


def test_the_explicit_design_faults_on_an_interrupt_from_user_mode():
    """Dave Hansen's 2017 list has no entry stack and no IDT: delivery reads
    the gate through the user tables and the CPU finds nothing there."""
    c = measure(boot("linux-6.1", "explicit", 2), "interrupt", pcid=True)
    assert any(f.startswith("idt+0xec0 (user view") for f in c.cold.faults)


def test_pti_off_has_one_view_and_never_walks_more_than_pti():
    for off, pti in zip(cost("linux-6.1", PTI_OFF, 2, 4, None, pcid=True),
                        cost("linux-6.1", "linux", 2, 4, None, pcid=True)):
        assert off.cold.lines_both_views == 0
        assert off.cold.walk_loads <= pti.cold.walk_loads


def test_without_pcid_the_warm_syscall_misses_again_and_with_pcid_it_does_not():
    with_pcid = measure(boot("linux-6.1", "linux", 2), "syscall", pcid=True)
    without = measure(boot("linux-6.1", "linux", 2), "syscall", pcid=False)
    assert with_pcid.warm.tlb_misses == 0
    assert without.warm.tlb_misses > 0


def test_a_sweep_covers_every_cpu_count_and_design():
    costs = sweep("linux-6.1", cpus=(1, 8), designs=["mirror", "linux"], workload="nmi")
    assert [(c.cpus, c.design) for c in costs] == [(1, "mirror"), (1, "linux"), (8, "mirror"), (8, "linux")]


def test_the_plot_is_written_as_png_and_svg(tmp_path):
    pytest.importorskip("matplotlib")
    from ptilab.report.plots import plot_refill

    costs = sweep("linux-6.1", cpus=(1, 4), designs=["mirror", "linux"], workload="syscall")
    for name in ("refill.png", "refill.svg"):
        assert plot_refill(costs, tmp_path / name).stat().st_size > 1000
