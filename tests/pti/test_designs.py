import numpy as np
import pytest

from ptilab.compare.layout_change import run as layout_change
from ptilab.compare.metrics import measure
from ptilab.compare.views import pages
from ptilab.errors import UsageError
from ptilab.linux.kernel import Kernel
from ptilab.pti import boot
from ptilab.linux.profiles import PROFILES, get_profile
from ptilab.memory.allocators import Allocator
from ptilab.paging import walk
from ptilab.pti import get_design
from ptilab.pti.explicit import ExplicitDesign

SHARING = ["mirror", "shared-pmd", "linux"]


def _user_view(k):
    w = walk(k.ram, k.user_cr3(), k.geometry)
    p = pages(w, 0, 1 << 64)
    return p[["va", "pa", "eff"]].tolist()


@pytest.mark.parametrize("profile", list(PROFILES))
@pytest.mark.parametrize("cpus", [1, 2, 7, 64])
def test_non_explicit_designs_give_the_identical_user_view(profile, cpus):
    views = [_user_view(boot(profile, d, cpus)) for d in SHARING]
    assert views[0] == views[1] == views[2]
    assert len(views[0]) > 0


def test_explicit_design_diverges_where_linux_changed_the_tss():
    report = measure(boot("linux-6.1", "explicit", cpus=2))
    tss = [d for d in report.cea_divergences if d.kind == "rights differ"]
    assert tss and all((d.user, d.kernel) == ("RW NX", "ro NX") and d.pages == 5 for d in tss)
    missing = {d.va & 0xFFFFF for d in report.cea_divergences if d.kind == "missing in user view"}
    assert 0x2000 in missing  # the entry stack page the 2017 list never knew


def test_explicit_design_matches_its_own_era():
    assert measure(boot("kaiser-2017", "explicit", cpus=4)).cea_divergences == []


@pytest.mark.parametrize("design", ["shared-pmd", "linux"])
def test_shared_designs_need_no_ap_work(design):
    report = measure(boot("kaiser-2017", design, cpus=64))
    assert not report.ap_work
    assert report.cea_divergences == []


@pytest.mark.parametrize("design", ["explicit", "mirror"])
def test_per_cpu_designs_work_again_for_every_ap(design):
    small = measure(boot("kaiser-2017", design, cpus=2))
    large = measure(boot("kaiser-2017", design, cpus=64))
    assert small.ap_work and large.ap_writes > small.ap_writes
    assert large.ap_allocations > 0  # new user PTE tables for APs whose areas cross 2 MiB


def test_sharing_uses_fewer_user_tables_than_mirroring():
    mirror = measure(boot("linux-6.1", "mirror", cpus=64))
    shared = measure(boot("linux-6.1", "linux", cpus=64))
    assert shared.user_table_pages < mirror.user_table_pages
    assert shared.pte_writes < mirror.pte_writes
    assert shared.tables_shared_with_kernel > mirror.tables_shared_with_kernel


class BuddyTooEarly(ExplicitDesign):
    """The seed's warning: kaiser_add_mapping() from setup_fixmap_gdt() for CPU 0."""

    name = "explicit-buddy-early"
    early_allocator = Allocator.BUDDY


def test_design_allocating_from_buddy_during_early_boot_is_reported():
    k = Kernel(get_profile("kaiser-2017"), BuddyTooEarly(), 2, 4).boot()
    bad = k.alloc.violations()
    assert bad and all(v.owner == "explicit-buddy-early" and v.phase.value == "early" for v in bad)
    assert "buddy allocator does not exist" in bad[0].violation
    assert measure(k).violations


def test_careful_designs_allocate_legally_in_every_phase():
    for profile in PROFILES:
        for design in ["explicit", *SHARING]:
            assert boot(profile, design, 8).alloc.violations() == []


def test_unknown_design_names_the_choices():
    with pytest.raises(UsageError, match="explicit, mirror, shared-pmd, linux"):
        get_design("kaiser")


def test_layout_change_breaks_only_the_explicit_design():
    outcomes = layout_change("linux-6.1", cpus=2)
    broken = {(o.change, o.design) for o in outcomes if not o.correct}
    assert {d for _, d in broken} == {"explicit"}
    kaiser = {(o.change, o.design): o.correct for o in layout_change("kaiser-2017", cpus=2)}
    assert kaiser[("as-is", "explicit")] and not kaiser[("tss-rights", "explicit")]
    assert not kaiser[("new-piece", "explicit")] and kaiser[("new-piece", "mirror")]


def test_five_level_boot_puts_cea_under_a_user_p4d():
    k = boot("linux-6.1", "linux", cpus=2, levels=5)
    w = walk(k.ram, k.user_cr3(), k.geometry)
    assert len(w.tables) == 5
    assert np.isin(w.tables[2], walk(k.ram, k.kernel_cr3(), k.geometry).tables[2]).any()


def test_layout_change_refuses_a_bad_base_configuration_instead_of_failing_every_design():
    from ptilab.errors import UsageError

    with pytest.raises(UsageError, match="between 1 and"):
        layout_change("linux-6.1", cpus=0)
    with pytest.raises(UsageError, match="no 5-level layout"):
        layout_change("kaiser-2017", cpus=2, levels=5)
