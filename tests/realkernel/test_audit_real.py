"""ptilab's audit and model judged against Debian's 6.1 kernel booted under QEMU."""

import numpy as np

from ptilab.audit import Severity, audit
from ptilab.audit.sources import views_from_image
from ptilab.compare.views import pages, rights
from ptilab.linux.kernel import boot
from ptilab.linux.profiles import CPU_ENTRY_AREA_BASE
from ptilab.paging import walk
from tests.realkernel.conftest import real_kernel


def test_fixture_is_a_pti_kernel_caught_in_user_mode(pti_kernel):
    meta = pti_kernel.meta
    assert meta["pti"] and meta["kernel_release"].startswith("6.1")
    assert pti_kernel.cpu()["cpl"] == 3
    assert pti_kernel.cpu()["cr3"] & 0x1000  # in user mode the CPU runs on the user PGD
    assert "Kernel/User page tables isolation: enabled" in (pti_kernel.path / "dmesg.txt").read_text()


def test_real_pti_kernel_passes_the_audit(pti_kernel):
    found = views_from_image(pti_kernel.mem, pti_kernel.cpu()["cr3"], pti_kernel.geometry, pti_kernel.symbols)
    assert found.pair.is_pti
    findings = audit(found.views)
    assert {f.id for f in findings if f.severity >= Severity.MEDIUM} == set()
    (summary,) = [f for f in findings if f.id == "PTI-USER-VIEW"]
    for words in ("cpu_entry_area", "gdt", "tss", "entry_stack_page", "estacks.DF_stack", "entry text",
                  "espfix", "aliased 65536 times", "2 per-CPU cpu_tss_rw"):
        assert words in summary.explanation


def test_pti_off_boot_is_flagged_as_exposing_the_kernel():
    k = real_kernel("pti-off")
    found = views_from_image(k.mem, k.cpu()["cr3"], k.geometry, k.symbols)
    assert not found.pair.is_pti
    top = audit(found.views)[0]
    assert top.id == "PTI-OFF" and top.severity is Severity.CRITICAL
    assert "direct map" in top.explanation


def test_kaslr_slide_is_inferred_from_the_entry_text_in_the_user_tables():
    unslid = real_kernel("pti-4level").symbols
    k = real_kernel("pti-kaslr")
    found = views_from_image(k.mem, k.cpu()["cr3"], k.geometry, unslid)
    assert found.kaslr_slide == k.symbols["_text"] - unslid["_text"]
    assert found.kaslr_slide != 0


def test_real_cpu_entry_area_matches_the_linux_6_1_profile_page_for_page(pti_kernel):
    real = walk(pti_kernel.mem, pti_kernel.cpu()["cr3"], pti_kernel.geometry)
    model_kernel = boot("linux-6.1", "linux", cpus=2, levels=pti_kernel.geometry.levels)
    model = walk(model_kernel.ram, model_kernel.user_cr3(), model_kernel.geometry)
    span = (CPU_ENTRY_AREA_BASE, CPU_ENTRY_AREA_BASE + (1 << 39))
    real_pages, model_pages = pages(real, *span), pages(model, *span)
    as_offsets = lambda p: [(int(va) - CPU_ENTRY_AREA_BASE, rights(int(eff)), bool(g))
                            for va, eff, g in zip(p["va"], p["eff"], p["glb"])]
    assert as_offsets(real_pages) == as_offsets(model_pages)
    # The TSS pages alias cpu_tss_rw; the model's frames differ, the aliasing must not.
    assert len(np.unique(real_pages["pa"])) == len(np.unique(model_pages["pa"]))


def test_model_user_view_has_the_real_kernels_shape(pti_kernel):
    real = walk(pti_kernel.mem, pti_kernel.cpu()["cr3"], pti_kernel.geometry, top_slots=(256, 512))
    k = boot("linux-6.1", "linux", cpus=2, levels=pti_kernel.geometry.levels)
    model = walk(k.ram, k.user_cr3(), k.geometry, top_slots=(256, 512))
    assert real.table_pages() == model.table_pages()
    assert int(real.mapped["size"].sum()) == int(model.mapped["size"].sum())


def test_meltdown_through_the_real_user_tables_recovers_the_kaslr_slide():
    from ptilab.mmu.meltdown import exposure

    unslid = real_kernel("pti-4level").symbols
    k = real_kernel("pti-kaslr")
    found = views_from_image(k.mem, k.cpu()["cr3"], k.geometry)
    result = exposure(k.mem, found.user, unslid)
    assert result.kaslr_slide == k.symbols["_text"] - unslid["_text"]
    assert result.text_base == k.symbols["_text"]


def test_real_kernels_walk_to_the_same_ranges_summarised_or_not(any_kernel):
    """The ESPfix area's aliases are summarised by the walker; expanded, the
    address space is record for record what walking every alias gives."""
    cpu = any_kernel.cpu()
    for cr3 in {cpu["cr3"] & ~0x1FFF, cpu["cr3"] & ~0xFFF}:
        w = walk(any_kernel.mem, cr3, any_kernel.geometry)
        full = walk(any_kernel.mem, cr3, any_kernel.geometry, _summarise=False)
        assert np.array_equal(w.ranges, full.ranges)
        assert [r.tolist() for r in w.table_refs] == [r.tolist() for r in full.table_refs]
        assert w.mapped_bytes() == full.mapped_bytes()
        assert len(w.distinct) < len(full.ranges) or not w.alias_count()
