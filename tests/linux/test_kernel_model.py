import numpy as np
import pytest

from ptilab.compare.views import pages, rights
from ptilab.errors import UsageError
from ptilab.pti import boot
from ptilab.linux.profiles import CPU_ENTRY_AREA_BASE
from ptilab.paging import translate, walk

# The cpu_entry_area of a real Debian 6.1 kernel (2 CPUs, nokaslr), from
# DESIGN.md, written out by hand so the test does not restate the profile.
REAL_6_1_CPU0 = (
    [(0x0000, "ro NX")]  # RO IDT
    + [(0x1000, "ro NX"), (0x2000, "RW NX")]  # GDT, entry stack
    + [(0x3000 + i * 0x1000, "ro NX") for i in range(5)]  # TSS, read-only on 64-bit
    + [(base + i * 0x1000, "RW NX") for base in (0x9000, 0xC000, 0xF000, 0x12000) for i in range(2)]  # IST stacks
    + [(0x1B000, "RW NX")]  # debug store
)
STRIDE = 0x3B000


def _expected(cpus: int) -> dict[int, str]:
    out = dict(REAL_6_1_CPU0[:1])
    for cpu in range(cpus):
        for off, r in REAL_6_1_CPU0[1:]:
            out[off + cpu * STRIDE] = r
    return out


@pytest.mark.parametrize("design", ["linux", "shared-pmd", "mirror"])
@pytest.mark.parametrize("levels", [4, 5])
def test_linux_6_1_user_cpu_entry_area_matches_the_real_kernel_page_for_page(design, levels):
    k = boot("linux-6.1", design, cpus=2, levels=levels)
    view = pages(walk(k.ram, k.user_cr3(), k.geometry), CPU_ENTRY_AREA_BASE, CPU_ENTRY_AREA_BASE + (1 << 30))
    got = {int(p["va"]) - CPU_ENTRY_AREA_BASE: rights(int(p["eff"])) for p in view}
    assert got == _expected(2)
    assert view["glb"].all()  # CEA PTEs are global since 4.17


def test_cpu_tss_rw_is_in_the_user_view_once_per_cpu():
    k = boot("linux-6.1", "linux", cpus=3)
    user = walk(k.ram, k.user_cr3(), k.geometry)
    direct = pages(user, k.page_offset, k.page_offset + k.ram.size)
    assert sorted(int(p["pa"]) for p in direct) == [k.percpu_pa(c, "cpu_tss_rw") for c in range(3)]
    assert set(rights(int(p["eff"])) for p in direct) == {"RW NX"}


def test_kernel_pgd_copies_of_user_entries_carry_nx_and_user_copies_do_not():
    k = boot("linux-6.1", "linux", cpus=1)
    kernel_slot = k.ram.read_entry(k.kernel_cr3().pgd)
    user_slot = k.ram.read_entry(k.user_cr3().pgd)
    assert kernel_slot == user_slot | (1 << 63)
    assert not user_slot >> 63


def test_user_view_holds_no_kernel_image_beyond_the_entry_text():
    k = boot("linux-6.1", "linux", cpus=2)
    user = walk(k.ram, k.user_cr3(), k.geometry)
    image = pages(user, 0xFFFFFFFF80000000, 0xFFFFFFFFA0000000)
    assert int(image["va"].min()) == 0xFFFFFFFF81C00000
    assert len(image) == 512  # one 2 MiB PMD cloned


def test_kernel_view_maps_everything_the_user_view_maps_in_the_kernel_half():
    k = boot("linux-4.15", "mirror", cpus=3, levels=5)
    user = walk(k.ram, k.user_cr3(), k.geometry, top_slots=(256, 512))
    kern = walk(k.ram, k.kernel_cr3(), k.geometry, top_slots=(256, 512))
    u = pages(user, 0, 1 << 64)
    kv = set(pages(kern, 0, 1 << 64)["va"].tolist())
    assert set(u["va"].tolist()) <= kv


@pytest.mark.parametrize("cpus", [0, 8193])
def test_nr_cpus_out_of_range_is_a_usage_error(cpus):
    with pytest.raises(UsageError, match="between 1 and 8192"):
        boot("linux-6.1", "linux", cpus=cpus)


def test_profile_without_five_level_layout_is_refused():
    with pytest.raises(UsageError, match="kaiser-2017 has no 5-level layout"):
        boot("kaiser-2017", "linux", cpus=2, levels=5)


def test_fixmap_of_2017_has_bounded_room():
    with pytest.raises(UsageError, match="fixmap"):
        boot("kaiser-2017", "explicit", cpus=1024)


def test_cpu_hotplug_offline_then_online_replays_ap_work():
    k = boot("kaiser-2017", "mirror", cpus=3)
    before = k.writes[("mirror", k.alloc.phase.AP_BRINGUP)]
    k.cpu_down(2)
    assert 2 not in k.online
    k.cpu_up(2)
    assert k.writes[("mirror", k.alloc.phase.AP_BRINGUP)] > before
    with pytest.raises(UsageError):
        k.cpu_up(2)


@pytest.mark.parametrize("profile", ["kaiser-2017", "linux-4.15", "linux-6.1"])
def test_cpu_area_template_gives_each_cpus_pieces_as_cea_set_pte_would(profile):
    from ptilab.linux.profiles import get_profile

    k = boot(profile, "linux" if profile != "kaiser-2017" else "explicit", cpus=70)
    for cpu in (0, 1, 63, 69):
        piecewise = k.area_ptes(cpu, lambda piece: k.cea_ptes(piece, cpu))
        assert (k.cpu_area_ptes(cpu) == piecewise).all()
    assert get_profile(profile).per_cpu  # a profile without per-CPU pieces would test nothing


@pytest.mark.parametrize("profile, levels", [("kaiser-2017", 4), ("linux-4.15", 4), ("linux-6.1", 4), ("linux-6.1", 5)])
def test_explicit_designs_stamped_user_ptes_are_its_piece_by_piece_ones(profile, levels):
    """ExplicitDesign maps each CPU's pieces from one stamp (Kernel.area_stamp):
    each CPU's user PTEs, and so the user tables and the write counts, are
    what walking its pieces for that CPU gives."""
    k = boot(profile, "explicit", cpus=70, levels=levels)
    design = k.design
    for cpu in (0, 1, 2, 63, 69):
        piecewise = k.area_ptes(cpu, lambda piece: design._ptes(piece, cpu))
        assert (design._area_ptes(cpu) == piecewise).all()
        assert piecewise.any()
    # The boot's user tables hold each CPU's PTEs as the piece-by-piece path makes them.
    for cpu in (1, 69):
        ptes = k.area_ptes(cpu, lambda piece: design._ptes(piece, cpu))
        for i in np.flatnonzero(ptes).tolist():
            t = translate(k.ram, k.user_cr3(), k.geometry.canonical(k.cpu_base(cpu) + i * 4096), k.geometry)
            assert t.leaf == int(ptes[i])
