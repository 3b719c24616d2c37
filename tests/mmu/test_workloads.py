"""Entry/exit workloads on booted kernels: they resolve, run, and cost what PTI's CR3 switches imply."""

import pytest

from ptilab.errors import InputError, UsageError
from ptilab.pti import boot
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


# One line naming the key and what it may hold, before anything runs.
BAD_WORKLOADS = [
    ('[[step]]\ndo = "read"\nat = "idt"\ncount = "many"\n', "step 1: 'count' must be an integer from 1 to 4096, not 'many'"),
    ('[[step]]\ndo = "read"\nat = "idt"\ncount = -3\n', "'count' must be an integer from 1 to 4096, not -3"),
    ('[[step]]\ndo = "read"\nat = "idt"\ncount = 1000000000\n', "'count' must be an integer from 1 to 4096"),
    ('[[step]]\ndo = "read"\nat = "idt"\ncount = true\n', "'count' must be an integer from 1 to 4096, not True"),
    ('processes = 1000000000\n', "'processes' must be an integer from 1 to 64, not 1000000000"),
    ('processes = 0\n', "'processes' must be an integer from 1 to 64, not 0"),
    ('processes = 2\n[[step]]\ndo = "switch_mm"\nto = 2\n', "step 1: 'to' must be an integer from 0 to 1, not 2"),
    ('[[step]]\ndo = "read"\nat = "idt+0x10000000000000000"\n', "'at': the offset must be below 0x100000000"),
    ('[[step]]\ndo = "read"\nat = "idt+٣"\n', "'at' must be NAME"),
    ('[[step]]\ndo = "read"\nat = "idt"\nstride = 1.5\n', "'stride' must be an integer from -4096 to 4096, not 1.5"),
    ('[[step]]\ndo = "read"\nat = "idt"\nprofiles = ["linux-9"]\n', "'profiles' must name kernel profiles"),
    ('[[step]]\ndo = "read"\nat = "idt"\nwhen = 3\n', "step 1: unknown key 'when'"),
    ('name = 7\n', "'name' must be a string of at most 80 characters, not 7"),
    ('step = 3\n', "'step' must be 1 to 2000 tables ([[step]]), not 3"),
    ("".join('[[step]]\ndo = "read"\nat = "idt"\ncount = 4096\n' for _ in range(5)),
     "the steps make 20480 accesses; at most 20000"),
]


@pytest.mark.parametrize("text, words", BAD_WORKLOADS, ids=[w for _, w in BAD_WORKLOADS])
def test_a_workload_outside_the_schema_is_one_line_naming_the_key(tmp_path, text, words):
    path = tmp_path / "w.toml"
    path.write_text(text)
    with pytest.raises(InputError) as refused:
        load(str(path))
    assert words in str(refused.value) and "\n" not in str(refused.value)


def test_a_binary_or_huge_workload_file_is_refused_unread(tmp_path):
    binary = tmp_path / "core.toml"
    binary.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(100))
    with pytest.raises(InputError, match="binary data, not a workload"):
        load(str(binary))
    huge = tmp_path / "huge.toml"
    with open(huge, "wb") as f:
        f.truncate(64 << 30)  # sparse: 64 GiB of nothing
    with pytest.raises(InputError, match="larger than 1024 KiB"):
        load(str(huge))


def test_an_address_past_2_64_is_refused_when_resolved():
    kernel = boot("linux-6.1", "linux", cpus=2)
    with pytest.raises(UsageError, match="outside the 64-bit address space"):
        resolve("lstar+0xffffffff", symbols(kernel, 1) | {"lstar": (0xFFFF_FFFF_FFFF_F000, 8)})


def test_cost_names_the_core_and_an_unknown_core_is_refused():
    from ptilab.errors import UsageError
    from ptilab.mmu.cost import cost

    (zen,) = cost("linux-6.1", "linux", cpus=2, workload="syscall", core="zen2")
    assert zen.core == "zen2" and zen.cold.accesses == zen.cold.l1_hits + zen.cold.stlb_hits + zen.cold.tlb_misses
    with pytest.raises(UsageError, match="unknown core"):
        cost("linux-6.1", "linux", cpus=2, workload="syscall", core="pentium")
